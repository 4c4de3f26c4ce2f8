"""dropin: :class:`FusedModel`, the fused executor behind the source model's own calls (``dualfuse.fuse``).

``fused = dualfuse.fuse(model)`` is an ``nn.Module`` (inference only) that answers the calls users make on the
source model — transformers' ``fused(**processor(...))``, ``get_text_features`` / ``get_image_features``,
``return_loss``, ``return_dict=False``; open_clip's ``fused(image, text)``, ``encode_image`` / ``encode_text`` —
and refuses, with a ValueError saying what it expected, every argument whose effect it would not reproduce.

What it keeps: the fused executor (the packed weights on the device) and the spec it was built from (the host
copy of the weights in the source model's dtype, which ``.to()`` / ``.half()`` / ``.float()`` re-fuse from and
``state_dict()`` returns). It does not keep the user's model nor a copy of it, except inside a fallback
executor (a model the kernels don't cover), which runs a private copy. For loading a source-format state dict it
keeps a skeleton of the source model on the ``meta`` device (structure only, no weight memory).

``fuse(model, keep_host_copy=False)`` drops that host copy too (its shapes stay, on the ``meta`` device): the
packed weights on the device are then the only weights. That matters where host and GPU share one memory (a
Jetson); the price is that nothing can be rebuilt: ``.to()`` / ``.half()`` / ``state_dict()`` raise, and
``load_state_dict`` needs every weight.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import DualEncoderSpec, PatchSequence, map_named_tensors, named_tensors
from .base import DTYPE_NAMES, same_device, resolve_dtype
from ..config import FusedConfig
from .auto import AutoExecutor
from .fused import FusedExecutor

# transformers' positional order of each family's calls
_FORWARD_ARGS = {
    "hf_clip": ("input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss",
                "interpolate_pos_encoding"),
    "hf_siglip2": ("input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes", "attention_mask",
                   "position_ids", "return_loss"),
}
_FORWARD_ARGS["hf_metaclip2"] = _FORWARD_ARGS["hf_siglip"] = _FORWARD_ARGS["hf_clip"]
_TEXT_ARGS = ("input_ids", "attention_mask", "position_ids")
_IMAGE_ARGS = {"hf_siglip2": ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
_CAUSAL_TEXT = ("hf_clip", "hf_metaclip2", "open_clip")  # text towers pooled at one token under a causal mask
# transformers' generic kwargs that change nothing the fused model returns when left at these values
_NO_OP_KWARGS = {"output_attentions": (None, False), "output_hidden_states": (None, False)}


class FusedModel(nn.Module):
    """Drop-in for the source model (inference only), served by the fused executor; see the module docstring
    and docs/dropin.md.

    - transformers: ``fused(input_ids=, pixel_values=, attention_mask=, position_ids=, return_loss=,
      return_dict=)`` -> the family's output class (``CLIPOutput`` / ``MetaClip2Output`` / ``SiglipOutput`` / ``Siglip2Output``) with
      ``loss`` (when asked), ``logits_per_image``, ``logits_per_text``, ``text_embeds``, ``image_embeds``
      (normalized); ``text_model_output`` / ``vision_model_output`` are None (the towers' hidden states are not
      kept). ``get_text_features`` / ``get_image_features`` return an output whose ``pooler_output`` holds the
      embeddings (as transformers 5 does; ``last_hidden_state`` is None).
    - open_clip: ``fused(image, text)`` -> ``(image_features, text_features, logit_scale.exp()[, logit_bias])``
      (a dict when the source model had ``output_dict=True``), ``encode_image`` / ``encode_text(...,
      normalize=False)``.
    - ``attention_mask``: accepted where it cannot change the output — causal towers (CLIP, MetaCLIP 2):
      right-padded with the pooled (EOS) token inside the mask; SigLIP / SigLIP2: all ones. Checked on the
      device with one read-back of a flag per call that passes a mask (none without one).
    """

    def __init__(self, executor: FusedExecutor, *, config=None, skeleton: nn.Module | None = None,
                 fuse_kwargs: dict | None = None, scale_shapes: tuple = ((), ()), output_dict: bool = False,
                 keep_host_copy: bool = True):
        super().__init__()
        if not isinstance(keep_host_copy, bool):
            raise ValueError(f"keep_host_copy must be True or False, got {keep_host_copy!r}")
        self.keep_host_copy = keep_host_copy
        self.training = False  # inference only: see train()
        self._config = config
        self._skeleton = skeleton  # the source model's structure on the meta device (load_state_dict)
        self._fuse_kwargs = dict(fuse_kwargs or {})
        self._scale_shapes = scale_shapes  # shapes of the source model's logit_scale / logit_bias
        self._output_dict = output_dict
        self._install(executor)

    def _install(self, executor: FusedExecutor):
        if (executor.fallback is None and not self.keep_host_copy and executor.spec.vision is not None
                and executor.spec.vision.embed.pos_grid is not None):
            raise ValueError("keep_host_copy=False is not available for SigLIP2 NaFlex models: each new patch grid "
                             "resizes the position embeddings from the kept weights")
        if executor.fallback is None and (executor.spec.device.type != "cpu" or not self.keep_host_copy):
            # the kept spec lives on the host: on the device only the packed weights (runners read the spec's
            # shapes, never its tensors)
            executor.spec = executor.spec.to("cpu" if self.keep_host_copy else "meta")
            if executor._grids:  # NaFlex grid executors made at fuse() hold the device spec; remade on demand
                executor._grids.clear()
        self.executor = executor
        self.spec = executor.spec
        self.family = executor.family
        io = executor.io
        kw = dict(dtype=executor.dtype, device=executor.device)
        self.logit_scale = nn.Parameter(torch.tensor(io.logit_scale, **kw).reshape(self._scale_shapes[0]),
                                        requires_grad=False)
        if io.logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(io.logit_bias, **kw).reshape(self._scale_shapes[1]),
                                           requires_grad=False)
        else:
            self.register_parameter("logit_bias", None)

    def __repr__(self):
        return f"<FusedModel {self.executor.io.name or self.family} {self.executor.dtype} on {self.executor.device}>"

    # -- nn.Module -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def config(self):
        """The source model's config object (transformers models; open_clip models have none)."""
        if self._config is None:
            raise AttributeError("config")  # -> __getattr__, which says why
        return self._config

    def __getattr__(self, name):
        if name == "config":  # a property's AttributeError lands here; nn.Module's message would hide why
            raise AttributeError(f"this FusedModel ({self.__dict__.get('family')}) has no config: the source "
                                 "model had none (open_clip models carry no config object)")
        return super().__getattr__(name)

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("FusedModel is inference-only (no gradients, no dropout): train(True) is not "
                             "supported; train the source model and fuse it again (or load_state_dict its weights)")
        self.training = False
        return self

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise ValueError("FusedModel is inference-only: its weights take no gradients")
        return self

    def _apply(self, fn, recurse=True):
        """``.to(device / dtype)``, ``.half()``, ``.float()``, ``.bfloat16()``, ``.cuda()``, ``.cpu()``: the
        target read off a probe tensor, then the executor rebuilt from the kept spec (same fuse() options)."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.dtype == self.dtype and same_device(probe.device, self.device):
            return self
        if probe.dtype not in DTYPE_NAMES:
            raise ValueError(f"FusedModel runs in fp16, bf16 or fp32; got a conversion to {probe.dtype}")
        self._need_host_copy(f"a conversion to {probe.dtype} on {probe.device}")
        self._install(self._rebuild(probe.dtype, probe.device))
        return self

    def _need_host_copy(self, what: str) -> None:
        if self.executor.fallback is None and not self.keep_host_copy:
            raise ValueError(f"{what} needs the host copy of the weights, which this FusedModel does not keep "
                             "(fused with keep_host_copy=False); fuse the source model again instead")

    def _rebuild(self, dtype, device, source=None) -> FusedExecutor:
        """A new executor in ``dtype`` on ``device`` from ``source`` (default: the kept spec, or the fallback's
        private copy of the model when the kernels don't cover it)."""
        if source is None:
            fb = self.executor.fallback
            source = fb.model if fb is not None else self.executor.spec
        return type(self.executor)(source, dtype=dtype, device=device, **self._fuse_kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The weights the fused model is built from, by name. Covered models: the spec's tensors in its own
        layout (``vision.blocks.0.qkv.weight`` is the packed q|k|v matrix, ...), host copies in the source
        model's dtype, plus ``logit_scale`` (and ``logit_bias``). Fallback: the private source model's state dict."""
        if args:
            raise ValueError("state_dict: pass destination / prefix / keep_vars by keyword")
        out = OrderedDict() if destination is None else destination
        fb = self.executor.fallback
        if fb is not None:
            for k, v in fb.model.state_dict(keep_vars=keep_vars).items():
                out[prefix + k] = v
            return out
        self._need_host_copy("state_dict()")
        for k, v in named_tensors(self.executor.spec):
            out[prefix + k] = v
        spec = self.executor.spec
        for name in self._logit_keys():
            out[prefix + name] = torch.tensor(getattr(spec, name), dtype=torch.float32, device=spec.device)
        return out

    def _logit_keys(self) -> tuple[str, ...]:
        """The scalars state_dict() adds to the spec's tensors: ``logit_scale`` (and ``logit_bias``)."""
        return ("logit_scale",) + (("logit_bias",) if self.executor.spec.logit_bias is not None else ())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Replace the weights and rebuild the executor (same dtype, device, fuse() options). Takes either
        ``state_dict()``'s format or the source model's own (a transformers / open_clip checkpoint of the same
        architecture: loaded into the meta skeleton, read into a spec by the adapter). Returns torch's
        ``(missing_keys, unexpected_keys)``; mismatched names (with ``strict``) or shapes raise ValueError."""
        from torch.nn.modules.module import _IncompatibleKeys

        if not isinstance(state_dict, dict):
            raise ValueError(f"load_state_dict: expected a dict of tensors, got {type(state_dict).__name__}")
        fb = self.executor.fallback
        if fb is not None:  # the private copy of the source model runs: load into it
            return fb.model.load_state_dict(state_dict, strict=strict)
        own = dict(named_tensors(self.executor.spec))  # names only: with keep_host_copy=False they are meta
        own.update(dict.fromkeys(self._logit_keys()))
        keys = set(state_dict)
        if keys & set(own) - {"logit_scale", "logit_bias"}:
            missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
            if strict and (missing or unexpected):
                raise ValueError(f"load_state_dict: keys do not match this FusedModel's state_dict(): missing "
                                 f"{missing[:8]}, unexpected {unexpected[:8]}")
            absent = [k for k in missing if k not in ("logit_scale", "logit_bias")]
            if not self.keep_host_copy and absent:
                raise ValueError(f"load_state_dict: this FusedModel was fused with keep_host_copy=False and keeps "
                                 f"no weights to fill in the {len(absent)} missing ones (e.g. {absent[:3]}); pass "
                                 "every weight")
            spec = _replace_tensors(self.executor.spec, state_dict)
            scale = float(state_dict["logit_scale"]) if "logit_scale" in state_dict else spec.logit_scale
            bias = spec.logit_bias
            if bias is not None and "logit_bias" in state_dict:
                bias = float(state_dict["logit_bias"])
            spec = dataclasses.replace(spec, logit_scale=scale, logit_bias=bias)
            self._install(self._rebuild(self.dtype, self.device, spec))
            return _IncompatibleKeys(missing, unexpected)
        if self._skeleton is None:
            raise ValueError("load_state_dict: the keys match neither this FusedModel's state_dict() nor a source "
                             f"model (this one was fused from a {type(self.executor.spec).__name__}); "
                             f"expected keys like {list(own)[:3]}")
        model = copy.deepcopy(self._skeleton)
        result = model.load_state_dict(state_dict, strict=strict, assign=True)
        left = [k for k, v in model.state_dict().items() if v.is_meta]
        if left:
            raise ValueError(f"load_state_dict: the source model's state dict lacks {len(left)} tensor(s) the fused "
                             f"model needs: {left[:8]}")
        self._install(self._rebuild(self.dtype, self.device, model))
        return result

    # -- open_clip calls ----------------------------------------------------------------------------------------
    def encode_image(self, pixel_values, normalize: bool = False):
        x = self.executor.encode_image(pixel_values)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids, normalize: bool = False):
        x = self.executor.encode_text(input_ids)
        return F.normalize(x, dim=-1) if normalize else x

    # -- transformers calls ---------------------------------------------------------------------------------
    def get_image_features(self, *args, **kwargs):
        names = _IMAGE_ARGS.get(self.family, ("pixel_values", "interpolate_pos_encoding"))
        a = _bind("get_image_features", names, args, kwargs)
        self._no_tuple(a, "get_image_features")
        px = self._pixels(a, "get_image_features")
        _reject_extra(a, "get_image_features", names)
        return _pooling_output(self.executor.encode_image(px))

    def get_text_features(self, *args, **kwargs):
        a = _bind("get_text_features", _TEXT_ARGS, args, kwargs)
        self._no_tuple(a, "get_text_features")
        ids = self._ids(a, "get_text_features")
        _reject_extra(a, "get_text_features", _TEXT_ARGS)
        return _pooling_output(self.executor.encode_text(ids))

    def forward(self, *args, **kwargs):
        if self.family == "open_clip":
            return self._open_clip_forward(*args, **kwargs)
        names = _FORWARD_ARGS[self.family]
        a = _bind("forward", names, args, kwargs)
        return_loss = bool(a.pop("return_loss", None))
        return_dict = a.pop("return_dict", None)
        if return_dict not in (None, True, False):
            raise ValueError(f"forward: return_dict must be None, True or False, got {return_dict!r}")
        _drop_no_ops(a)
        ids = self._ids(a, "forward")
        px = self._pixels(a, "forward")
        _reject_extra(a, "forward", names + ("return_dict",))
        if ids is None or px is None:
            raise ValueError("forward: expected both input_ids and pixel_values (as the source model's forward); "
                             "for one tower use get_text_features / get_image_features")
        img, txt = self.executor.encode(px, ids)
        per_image, per_text = self.executor.logits(img, txt)
        loss = _loss(self.family, per_text) if return_loss else None
        out = _output_class(self.family)(
            loss=loss, logits_per_image=per_image, logits_per_text=per_text,
            text_embeds=F.normalize(txt, dim=-1), image_embeds=F.normalize(img, dim=-1))
        return out if return_dict is not False else out.to_tuple()

    def _open_clip_forward(self, *args, **kwargs):
        a = _bind("open_clip forward", ("image", "text"), args, kwargs)
        image, text = a.pop("image", None), a.pop("text", None)
        if a:
            raise ValueError(f"open_clip-style call: expected fused(image, text); got unsupported argument(s) "
                             f"{sorted(a)}")
        if image is not None and text is not None:
            img, txt = self.executor.encode(image, text)
        else:
            img = self.executor.encode_image(image) if image is not None else None
            txt = self.executor.encode_text(text) if text is not None else None
        img = F.normalize(img, dim=-1) if img is not None else None
        txt = F.normalize(txt, dim=-1) if txt is not None else None
        scale = self.logit_scale.exp()
        if self._output_dict:
            out = {"image_features": img, "text_features": txt, "logit_scale": scale}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return img, txt, scale, self.logit_bias
        return img, txt, scale

    # -- argument checks ------------------------------------------------------------------------------------
    @staticmethod
    def _no_tuple(a: dict, where: str):
        if a.pop("return_dict", None) is False:
            raise ValueError(f"{where}: return_dict=False is not supported: the source model's tuple starts with "
                             "last_hidden_state, which the fused model does not keep; use the returned "
                             ".pooler_output (the embeddings)")
        _drop_no_ops(a)

    def _pixels(self, a: dict, where: str):
        if a.pop("interpolate_pos_encoding", False):
            s = self.executor.io.image_size
            raise ValueError(f"{where}: interpolate_pos_encoding=True is not supported: the fused model runs at the "
                             f"model's image size {s}x{s}; resize the images to it (the model's image processor does)")
        px = a.pop("pixel_values", None)
        if self.family == "hf_siglip2":
            shapes, mask = a.pop("spatial_shapes", None), a.pop("pixel_attention_mask", None)
            if px is not None and not isinstance(px, PatchSequence):
                if shapes is None or mask is None:
                    raise ValueError(f"{where}: SigLIP2 NaFlex: pass pixel_values with spatial_shapes and "
                                     "pixel_attention_mask, as its image processor returns them "
                                     "(fused(**processor(images=..., text=...)))")
                px = PatchSequence(px, shapes, mask)
        return px

    def _ids(self, a: dict, where: str):
        ids = a.pop("input_ids", None)
        mask, pos = a.pop("attention_mask", None), a.pop("position_ids", None)
        if ids is None:
            if mask is not None or pos is not None:
                raise ValueError(f"{where}: attention_mask / position_ids given without input_ids")
            return None
        if mask is None and pos is None:
            return ids
        ids = self.executor.validate(None, ids)[1]
        flags, checks = [], []
        if mask is not None:
            f, msgs = _mask_flags(self.family, self.executor.io, ids, mask, where)
            flags += f
            checks += msgs
        if pos is not None:
            flags.append(_position_flag(ids, pos, where))
            checks.append(f"{where}: position_ids must be the default positions 0..{ids.shape[1] - 1} "
                          "(torch.arange(length)): the fused model adds the model's position embeddings in order; "
                          "pass position_ids=None")
        bits = torch.stack(flags).tolist()  # the one read-back of a call that passes a mask / positions
        for bad, msg in zip(bits, checks):
            if bad:
                raise ValueError(msg)
        return ids


class FusedTower(FusedModel):
    """Drop-in for a single tower (inference only): transformers' CLIPVisionModel(WithProjection),
    CLIPTextModel(WithProjection), the MetaCLIP 2 ones, SiglipVisionModel, SiglipTextModel, Siglip2VisionModel, or
    open_clip's ``model.visual``; also a VLM's vision tower in place (``vlm.model.vision_tower = fuse(...)``).

    ``fused(pixel_values, output_hidden_states=, return_dict=)`` (text: ``input_ids``, ``attention_mask``) returns
    the source class's own output: ``BaseModelOutputWithPooling`` / ``CLIPVisionModelOutput`` /
    ``CLIPTextModelOutput`` / ... with ``last_hidden_state``, ``pooler_output`` or ``image_embeds`` /
    ``text_embeds``, and ``hidden_states`` when asked: ``output_hidden_states=True`` (all: the embeddings output,
    then each layer's) or an index / list of indices (transformers 5's selection, as LLaVA passes
    ``vision_feature_layer``: the others are None). Only what the call asks for is written.
    ``dualfuse.fuse(tower, hidden_states=(-2,))`` builds for those layers only (the later blocks never run, the
    pooling head neither); ``pooled=False`` drops the head. Outputs the fuse() options ruled out come back as
    None (``pooler_output``, ``last_hidden_state``); asking for a hidden state outside them raises ValueError.
    open_clip's ``model.visual``: ``fused(images)`` -> the embeddings, as the source returns them."""

    def __init__(self, executor: FusedExecutor, *, source_class: str = "", **kwargs):
        self._source_class_name = source_class  # the output class follows it (set before nn.Module's __init__)
        super().__init__(executor, **kwargs)

    @property
    def _source_class(self) -> str:
        return self.__dict__["_source_class_name"]

    def _install(self, executor: FusedExecutor):
        super()._install(executor)
        del self.logit_scale, self.logit_bias  # a single tower has no logits
        self.tower = executor.io.towers[0]

    def __repr__(self):
        return f"<FusedTower {self._source_class or self.tower} {self.executor.dtype} on {self.executor.device}>"

    def forward(self, *args, **kwargs):
        if self.family == "open_clip":
            a = _bind("forward", ("x",), args, kwargs)
            x = a.pop("x", None)
            _reject_extra(a, "forward", ("x",))
            return self.executor.encode_image(x)
        if self.tower == "vision":
            names = _IMAGE_ARGS.get(self.family, ("pixel_values", "interpolate_pos_encoding"))
        else:
            names = _TEXT_ARGS
        a = _bind("forward", names, args, kwargs)
        return_dict = a.pop("return_dict", None)
        if return_dict not in (None, True, False):
            raise ValueError(f"forward: return_dict must be None, True or False, got {return_dict!r}")
        hidden = a.pop("output_hidden_states", None)
        # transformers' defaults when the call leaves them out: the model config's return_dict / output_hidden_states
        if return_dict is None and self._config is not None:
            return_dict = getattr(self._config, "return_dict", None)
        if hidden is None and self._config is not None:
            hidden = getattr(self._config, "output_hidden_states", None)
        attentions = a.pop("output_attentions", None)
        if attentions is None and self._config is not None:  # transformers' default: the config's
            attentions = getattr(self._config, "output_attentions", None)
        if attentions not in (None, False):
            raise ValueError("forward: output_attentions is not supported (asked for by the call or by the model "
                             "config's output_attentions=True): the fused attention kernel does not materialize "
                             "the attention weights")
        if self.executor.fallback is not None:  # the private source model, called as the user called it
            px = a.get("pixel_values")
            if isinstance(px, torch.Tensor) and px.dtype == torch.uint8:  # frames: normalized as the fused path does
                a["pixel_values"] = self.executor.validate(px, None)[0]
            a.update(return_dict=return_dict, output_hidden_states=hidden)
            return self.executor.fallback.model(**{k: v for k, v in a.items() if v is not None})
        if self.tower == "vision":
            x = self._pixels(a, "forward")
            if x is None:
                raise ValueError("forward: expected pixel_values")
        else:
            mask = a.get("attention_mask")
            x = self._ids(a, "forward")
            if x is None:
                raise ValueError("forward: expected input_ids")
            # a tower fused for its pooled output alone (hidden_states=()) returns no token outputs: a mask the
            # checks of _ids let through (causal towers: right-padded, the pooled token inside) changes nothing
            if (isinstance(mask, torch.Tensor) and self.executor.hidden_states != ()
                    and not bool((mask != 0).all())):
                raise ValueError("forward: attention_mask with padding (zeros): the fused text tower's token outputs "
                                 "(last_hidden_state, hidden_states) at padded positions differ from the source's "
                                 "(the kernels do not mask keys); pass input_ids without a mask (padding="
                                 "'max_length', as CLIP text encoders are used), or fuse the tower for its pooled "
                                 "output alone, which takes right-padded masks: dualfuse.fuse(tower, "
                                 "hidden_states=(), pooled=True)")
        _reject_extra(a, "forward", names + ("return_dict", "output_hidden_states", "output_attentions"))
        if hidden is None or hidden is False:
            sel = ()
        elif hidden is True:
            # all of them; a tower fused for some (fuse(hidden_states=...)) gives those, and a clear error on reading
            # another (transformers before index selection passes True where LLaVA reads one layer)
            sel = self.executor.hidden_states
        elif isinstance(hidden, int):
            sel = (hidden,)
        elif isinstance(hidden, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in hidden):
            sel = tuple(hidden)
        else:
            raise ValueError(f"forward: output_hidden_states must be None, a bool, an index or a list of indices, "
                             f"got {hidden!r}")
        if isinstance(x, PatchSequence):  # SigLIP2 NaFlex: images grouped by patch grid, pooled output only
            if sel != ():
                raise ValueError("forward: output_hidden_states is not supported for SigLIP2 NaFlex towers (each "
                                 "image runs at its own patch grid); the fused tower gives pooler_output only")
            out = _tower_output(self._source_class, self.tower, None, self.executor.encode_image(x), None)
            return out if return_dict is not False else out.to_tuple()
        ex = self.executor
        fused_for = ex.hidden_states
        if sel == () and not ex.pooled and fused_for is not None and \
                getattr(ex.spec, self.tower).num_layers not in fused_for:
            raise ValueError(f"forward: this call would return nothing: the tower was fused for hidden states "
                             f"{fused_for} only (fuse(..., hidden_states=...): no last_hidden_state, no pooled "
                             "output); ask for them with output_hidden_states=True or an index, or fuse the source "
                             "model again for what this caller reads")
        r = ex.encode_tower(x, hidden=sel)
        hs = None
        if sel != ():
            layers = getattr(self.executor.spec, self.tower).num_layers
            want = set(range(layers + 1)) if sel is None else {self.executor.hidden_index(i, layers) for i in sel}
            hs = tuple(r["hidden"][k] if k in want else None for k in range(layers + 1))
            if hidden is True and self.executor.hidden_states is not None:
                hs = FusedHiddenStates(hs, self.executor.hidden_states)
        out = _tower_output(self._source_class, self.tower, r["last"], r["pooled"], hs)
        return out if return_dict is not False else out.to_tuple()

    def _logit_keys(self) -> tuple[str, ...]:
        return ()  # a single tower has no logits: its state_dict() is the spec's tensors alone


class FusedHiddenStates(tuple):
    """The hidden states of a tower fused for some of them (``fuse(tower, hidden_states=...)``) when a call asks for
    all: the computed ones by index as usual; reading another raises ValueError instead of giving None."""

    def __new__(cls, items, computed):
        t = super().__new__(cls, items)
        t.computed = tuple(computed)
        return t

    def __getitem__(self, i):
        x = super().__getitem__(i)
        if x is None:
            raise ValueError(f"hidden_states[{i}] was not computed: this tower was fused for hidden states "
                             f"{self.computed} (fuse(..., hidden_states=...)); fuse the source model again with the "
                             "hidden states its callers need")
        return x


def _tower_output(source_class: str, tower: str, last, pooled, hidden):
    """The source tower class's output object."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if source_class.endswith("WithProjection"):
        if source_class.startswith("MetaClip2"):
            from transformers.models.metaclip_2 import modeling_metaclip_2 as mod
            prefix = "MetaClip2"
        else:
            from transformers.models.clip import modeling_clip as mod
            prefix = "CLIP"
        cls = getattr(mod, f"{prefix}{'Vision' if tower == 'vision' else 'Text'}ModelOutput")
        key = "image_embeds" if tower == "vision" else "text_embeds"
        return cls(**{key: pooled}, last_hidden_state=last, hidden_states=hidden)
    return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


def _drop_no_ops(a: dict):
    for k, ok in _NO_OP_KWARGS.items():
        if k in a and any(a[k] is o for o in ok):
            del a[k]


def _bind(where: str, names: tuple, args: tuple, kwargs: dict) -> dict:
    if len(args) > len(names):
        raise ValueError(f"{where}: takes at most {len(names)} positional arguments ({', '.join(names)}), "
                         f"got {len(args)}")
    a = dict(zip(names, args))
    both = sorted(set(a) & set(kwargs))
    if both:
        raise ValueError(f"{where}: got {both} both positionally and by keyword")
    a.update(kwargs)
    return a


def _mask_flags(family: str, io, ids: torch.Tensor, mask, where: str):
    """Device-side flags (0-d bool tensors), each True when the mask would change the output, and their messages."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = f"shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{where}: attention_mask: expected a tensor of input_ids' shape {list(ids.shape)} (1 for "
                         f"tokens, 0 for padding), got {got}")
    if not same_device(mask.device, ids.device):
        raise ValueError(f"{where}: attention_mask: expected a tensor on {ids.device} (input_ids' device), got one "
                         f"on {mask.device}")
    on = mask != 0
    flags = [(on & (mask != 1)).any()]
    msgs = [f"{where}: attention_mask: expected 0s and 1s (1 for tokens, 0 for padding)"]
    if family not in _CAUSAL_TEXT:  # SigLIP / SigLIP2: bidirectional text tower pooled at the last token
        flags.append(~on.all())
        msgs.append(f"{where}: attention_mask with padding (zeros) is not supported for SigLIP models: their "
                    "text tower attends over all positions and pools the last one, so a mask changes every token; "
                    "the fused kernels do not mask keys. SigLIP is trained on text padded to max_length=64 without "
                    "a mask: tokenize with padding='max_length' (max_length=64) and pass input_ids alone (or an "
                    "all-ones mask)")
        return flags, msgs
    flags.append((on[:, 1:] & ~on[:, :-1]).any())
    msgs.append(f"{where}: attention_mask must be right-padded (each row 1s then 0s, as CLIP's tokenizer pads "
                "by default): a left-padded mask changes which tokens the causal text tower sees, and the fused "
                "kernels do not mask keys; tokenize with padding_side='right' or pass input_ids without a mask")
    if io.text_pooling == "first_eos":
        pooled = (ids == io.eos_token_id).int().argmax(-1)
    else:  # "argmax": the highest id (the EOS token of CLIP's vocabulary)
        pooled = ids.argmax(-1)
    flags.append(~on.gather(1, pooled[:, None]).all())
    msgs.append(f"{where}: attention_mask masks the pooled token (the EOS token, where the text tower reads the "
                "embedding): expected the mask to cover each row up to and including its EOS token")
    return flags, msgs


def _position_flag(ids: torch.Tensor, pos, where: str) -> torch.Tensor:
    b, n = ids.shape
    if (not isinstance(pos, torch.Tensor) or pos.is_floating_point() or pos.dim() != 2
            or pos.shape[1] != n or pos.shape[0] not in (1, b)):
        raise ValueError(f"{where}: position_ids: expected an integer tensor [1 or {b}, {n}] (the default "
                         f"torch.arange({n})), got {pos if not isinstance(pos, torch.Tensor) else list(pos.shape)}")
    if not same_device(pos.device, ids.device):
        raise ValueError(f"{where}: position_ids: expected a tensor on {ids.device} (input_ids' device), got one "
                         f"on {pos.device}")
    return (pos != torch.arange(n, device=pos.device)).any()


def _reject_extra(kwargs: dict, where: str, accepted: tuple = ()):
    if kwargs:
        raise ValueError(f"{where}: unsupported argument(s) {sorted(kwargs)}; the fused model takes "
                         f"{', '.join(accepted) or 'pixel_values / input_ids'}")


def _pooling_output(x):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=x)


def _output_class(family: str):
    if family == "hf_siglip2":
        from transformers.models.siglip2.modeling_siglip2 import Siglip2Output
        return Siglip2Output
    if family == "hf_siglip":
        from transformers.models.siglip.modeling_siglip import SiglipOutput
        return SiglipOutput
    if family == "hf_metaclip2":
        from transformers.models.metaclip_2.modeling_metaclip_2 import MetaClip2Output
        return MetaClip2Output
    from transformers.models.clip.modeling_clip import CLIPOutput
    return CLIPOutput


def _loss(family: str, per_text: torch.Tensor) -> torch.Tensor:
    """transformers' loss on logits_per_text [texts, images]: CLIP's symmetric cross-entropy, SigLIP's
    sigmoid loss (both need as many texts as images, text i matching image i)."""
    if per_text.shape[0] != per_text.shape[1]:
        raise ValueError(f"return_loss=True needs as many texts as images (pair i is text i with image i), got "
                         f"{per_text.shape[0]} texts and {per_text.shape[1]} images")
    n = per_text.shape[0]
    if family in ("hf_siglip", "hf_siglip2"):
        eye = torch.eye(n, device=per_text.device)
        loglik = F.logsigmoid((2 * eye - torch.ones_like(per_text)) * per_text)
        return (-loglik.sum(dim=-1)).mean()
    target = torch.arange(n, device=per_text.device)
    return (F.cross_entropy(per_text, target) + F.cross_entropy(per_text.t(), target)) / 2.0


def _replace_tensors(spec, state: dict):
    """A copy of the spec with each tensor named in ``state`` replaced by a copy of it (shape checked, kept in the
    spec's dtype on the host)."""
    def replace(name, obj):
        if name not in state:
            return obj
        new = state[name]
        if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(obj.shape):
            got = list(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"load_state_dict: {name}: expected shape {list(obj.shape)}, got {got}")
        device = "cpu" if obj.is_meta else obj.device  # keep_host_copy=False: the shapes only, on meta
        return new.detach().to(device=device, dtype=obj.dtype).clone()

    return map_named_tensors(spec, replace)


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """The model's structure with its parameters and persistent buffers on the meta device (no weight memory);
    non-persistent buffers (position ids, masks) are copied."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _source_dtype(model) -> torch.dtype:
    if isinstance(model, DualEncoderSpec):
        return model.dtype
    from ..adapters import family_of

    family_of(model)  # a clear ValueError naming the supported classes for anything else
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"fuse: the model's weights are {dtype}; the fused kernels run fp16, bf16 or fp32: "
                         "pass dtype= (e.g. dtype=torch.float32)")
    return dtype


def fuse(model, dtype=None, device=None, config: FusedConfig | None = None, **kwargs) -> FusedModel:
    """``dualfuse.fuse(model)``: the user's HF CLIPModel / MetaClip2Model / SiglipModel / Siglip2Model, open_clip
    CLIP / CustomTextCLIP, a preset name or a DualEncoderSpec -> a drop-in :class:`FusedModel`; a single tower
    (adapters.TOWER_CLASSES: CLIPVisionModel, SiglipTextModel, open_clip ``model.visual``, ...) -> a
    :class:`FusedTower` (options ``hidden_states=`` / ``pooled=``: see FusedTower).

    ``dtype``: default the source model's dtype (``fuse(model.half())`` runs fp16, ``fuse(model)`` of an fp32
    model runs fp32; pass ``dtype=torch.float16`` for speed). ``device``: default CUDA when there is one, else CPU.
    ``config``: the FusedExecutor options (dualfuse.FusedConfig); ``kwargs``: any of its fields, applied over
    ``config``; both kept for rebuilds (``.to()``, ``.half()``, ``load_state_dict``); e.g.
    ``weights="int8"``: weight-only int8 for every linear layer (``"fp8"`` on compute capability >= 8.9; see
    dualfuse.quantize); and ``keep_host_copy`` (default True; False keeps no host copy of the weights, see the
    module docstring); and ``executor="auto"``: the fused executor where it wins, the graph executor where
    it doesn't, per call-shape family, from this card's calibration (dualfuse.executors.auto; not the default).
    The source model is left untouched and not kept."""
    keep_host_copy = kwargs.pop("keep_host_copy", True)
    if config is not None:
        kwargs["config"] = config
    # executor: "fused" (default) or "auto" (fused or the graph executor per call-shape family, from this card's
    # calibration: dualfuse.executors.auto)
    which = kwargs.pop("executor", "fused")
    if which not in ("fused", "auto"):
        raise ValueError(f"executor must be 'fused' or 'auto', got {which!r}")
    cls = AutoExecutor if which == "auto" else FusedExecutor
    if isinstance(model, str):
        from ..presets import load

        model = load(model)
    from ..adapters import tower_of

    dtype = _source_dtype(model) if dtype is None else resolve_dtype(dtype)
    if tower_of(model) is not None:
        if which == "auto":
            raise ValueError("executor='auto' is not available for a single tower: fuse it with the default "
                             "executor='fused'")
        module_cls = functools.partial(FusedTower, source_class="" if isinstance(model, DualEncoderSpec)
                                       else type(model).__name__)
    else:
        module_cls = FusedModel
    executor = cls(model, dtype=dtype, device=device, **kwargs)
    if isinstance(model, DualEncoderSpec):
        return module_cls(executor, fuse_kwargs=kwargs, keep_host_copy=keep_host_copy)
    shapes = tuple(tuple(getattr(model, n).shape) if isinstance(getattr(model, n, None), torch.Tensor) else ()
                   for n in ("logit_scale", "logit_bias"))
    return module_cls(executor, config=copy.deepcopy(getattr(model, "config", None)),
                      skeleton=_meta_skeleton(model), fuse_kwargs=kwargs, scale_shapes=shapes,
                      output_dict=bool(getattr(model, "output_dict", False)), keep_host_copy=keep_host_copy)
