"""The fused executor (and the drop-in, and the graph executor on a GPU) under threads, streams and faults.

CPU (Triton interpreter): calls from several threads equal serial calls bit for bit; outputs never alias a
runner's static buffers; a bad call (token id out of the vocabulary, wrong shape, wrong dtype) leaves the next
call exact; a KeyboardInterrupt or an out-of-memory error while a runner is built leaves nothing half-built in the
cache. On a GPU the same tests run on CUDA, plus stream ordering, interrupted captures and real memory pressure.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

import dualfuse
from dualfuse import reference
from dualfuse.adapters import to_spec
from dualfuse.bench import random_inputs
from dualfuse.executors.fused import FusedExecutor
from dualfuse.executors.fused import runner as runner_mod

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"  # as tests/conftest.py: the interpreter on CPU
DTYPE = torch.float16 if HAS_CUDA else torch.float32


def _inputs(io, bi, bt, seed, text_len=None):
    (px, ids), = random_inputs(io, max(bi, 1), max(bt, 1), sets=1, seed=seed, device=DEV)
    if text_len is not None:  # a shorter text: its first text_len - 1 tokens, then the EOS (the largest id)
        ids = torch.cat([ids[:, :text_len - 1], ids.max(dim=1, keepdim=True).values], dim=1)
    return (px.to(DTYPE) if bi else None), (ids if bt else None)


def _call(ex, px, ids):
    if px is not None and ids is not None:
        return ex.encode(px, ids)
    if px is not None:
        return ex.encode_image(px), None
    return None, ex.encode_text(ids)


def _equal(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _close_to_reference(spec, px, ids, img, txt):
    for out, want in ((img, None if px is None else reference.encode_image(spec, px.float().cpu())),
                      (txt, None if ids is None else reference.encode_text(spec, ids.cpu()))):
        if out is not None:
            cos = F.cosine_similarity(out.float().cpu(), want.float(), dim=-1)
            assert cos.min().item() >= 0.999, cos


def _static_storages(ex):
    """Data pointers of every static buffer of every cached runner (NaFlex grid executors included)."""
    execs = [ex] + list((ex._grids or {}).values())
    ptrs = set()
    for e in execs:
        for r in e.runners.values():
            ptrs.add(r.output.untyped_storage().data_ptr())
            for b in r.buf.values():
                ptrs |= {v.untyped_storage().data_ptr() for v in vars(b).values() if isinstance(v, torch.Tensor)}
    return ptrs


@pytest.fixture(scope="module")
def clip():
    model = dualfuse.load("clip-tiny")
    return to_spec(model), FusedExecutor(model, dtype=DTYPE, device=DEV)


# --------------------------------------------------------------------------------------------- threads

def _run_threads(n_threads, calls_per_thread, jobs, fn):
    """Each thread makes calls_per_thread calls, job (t + 3 k) % len(jobs); returns [(job, result)] per thread."""
    results = [[] for _ in range(n_threads)]
    errors = []
    start = threading.Barrier(n_threads)

    def work(t):
        try:
            start.wait()
            for k in range(calls_per_thread):
                j = (t + 3 * k) % len(jobs)
                results[t].append((j, fn(jobs[j])))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


@pytest.mark.slow
def test_threads_on_the_drop_in_equal_serial_calls():
    """4 threads share one FusedModel: transformers forward (logits), get_image_features and get_text_features on
    shapes that share runners and shapes that don't; every result equals the serial call's, bit for bit."""
    fused = dualfuse.fuse("clip-tiny", dtype=DTYPE, device=DEV)
    io = fused.executor.io
    shapes = [(1, 1, None), (2, 1, 11), (1, 0, None), (0, 2, None), (2, 2, None)]
    jobs = [_inputs(io, bi, bt, seed=i, text_len=n) for i, (bi, bt, n) in enumerate(shapes)]

    def call(job):
        px, ids = job
        if px is not None and ids is not None:
            out = fused(input_ids=ids, pixel_values=px)
            return out.logits_per_image, out.image_embeds, out.text_embeds
        if px is not None:
            return (fused.get_image_features(pixel_values=px).pooler_output,)
        return (fused.get_text_features(input_ids=ids).pooler_output,)

    serial = [call(job) for job in jobs]
    per = 20 if HAS_CUDA else 2  # the interpreter takes seconds a call
    for per_thread in _run_threads(4, per, jobs, call):
        assert len(per_thread) == per
        for j, got in per_thread:
            assert all(torch.equal(a, b) for a, b in zip(got, serial[j])), f"job {j} differs from its serial call"
    assert len(fused.executor.runners) <= fused.executor.max_graphs


# --------------------------------------------------------------------------------------------- aliasing

@pytest.mark.slow
@pytest.mark.parametrize("path", ["both", "image", "text", "bucket", "uint8"])
def test_outputs_never_alias_static_buffers(clip, path):
    """A held output is unaffected by the next call of the same shape, mutating it does not reach the runner,
    and no output shares storage with a runner's buffers."""
    spec, ex = clip
    io = ex.io
    a = _inputs(io, 1, 2, seed=1, text_len=11 if path == "bucket" else None)
    b = _inputs(io, 1, 2, seed=2, text_len=11 if path == "bucket" else None)
    if path == "image":
        a, b = (a[0], None), (b[0], None)
    elif path == "text":
        a, b = (None, a[1]), (None, b[1])
    elif path == "uint8":  # camera frames [B, H, W, C]
        g = torch.Generator().manual_seed(3)
        frames = [torch.randint(0, 256, (2, io.image_size, io.image_size, io.channels), generator=g,
                                dtype=torch.uint8).to(DEV) for _ in range(2)]
        a, b = (frames[0], None), (frames[1], None)
    first = _call(ex, *a)
    kept = tuple(None if o is None else o.clone() for o in first)
    second = _call(ex, *b)
    assert all(_equal(x, y) for x, y in zip(first, kept)), "the next call changed a held output"
    assert not all(_equal(x, y) for x, y in zip(first, second)), "different inputs gave the same output"
    static = _static_storages(ex)
    for o in first + second:
        if o is not None:
            assert o.untyped_storage().data_ptr() not in static
            o.add_(1.0)  # the caller owns it
    third = _call(ex, *a)
    assert all(_equal(x, y) for x, y in zip(third, kept)), "mutating an output reached the runner"


@pytest.mark.slow
def test_naflex_and_drop_in_logits_never_alias_static_buffers():
    pytest.importorskip("transformers.models.siglip2")
    fused = dualfuse.fuse("siglip2-tiny", dtype=DTYPE, device=DEV)
    ex = fused.executor
    (seq, ids), = random_inputs(ex.io, 2, 2, sets=1, seed=4, device=DEV)
    kw = dict(pixel_values=seq.pixel_values, spatial_shapes=seq.spatial_shapes,
              pixel_attention_mask=seq.pixel_attention_mask)
    first = fused(input_ids=ids, **kw)
    kept = [t.clone() for t in (first.logits_per_image, first.image_embeds)]
    img = ex.encode_image(seq)
    static = _static_storages(ex)
    assert img.untyped_storage().data_ptr() not in static
    assert first.logits_per_image.untyped_storage().data_ptr() not in static
    img.add_(1.0)
    again = fused(input_ids=ids, **kw)
    assert torch.equal(first.logits_per_image, kept[0]) and torch.equal(first.image_embeds, kept[1])
    assert torch.equal(again.logits_per_image, kept[0])


# --------------------------------------------------------------------------------------------- bad calls

@pytest.mark.slow
def test_bad_calls_leave_the_next_call_exact(clip):
    spec, ex = clip
    io = ex.io
    px, ids = _inputs(io, 1, 2, seed=5)
    want = ex.encode(px, ids)
    r = ex.runner(1, 2, ids.shape[1])
    bad = ids.clone()
    bad[1, 3] = io.vocab_size + 2
    with pytest.raises(ValueError, match=r"input_ids: token ids out of the vocabulary"):
        ex.encode(px, bad)
    assert int(r.embed_op.bad_ids.item()) == 0  # the flag was reset
    assert all(torch.equal(x, y) for x, y in zip(ex.encode(px, ids), want))
    with pytest.raises(ValueError, match=r"pixel_values: expected images of"):
        ex.encode(px[..., :-2], ids)
    with pytest.raises(ValueError, match=r"pixel_values: expected a floating-point tensor"):
        ex.encode(px.to(torch.int32), ids)
    with pytest.raises(ValueError, match=r"input_ids"):
        ex.encode(px, ids.float())
    with pytest.raises(ValueError, match=r"input_ids"):
        ex.encode_text(ids[0])  # 1-D
    assert all(torch.equal(x, y) for x, y in zip(ex.encode(px, ids), want))
    assert torch.equal(ex.encode_text(ids), want[1])  # its own runner; the text runner's flag is fresh too


# --------------------------------------------------------------------------------------------- faults in a build

def _fault_leaves_nothing_behind(monkeypatch, clip, fault, match, bi, bt):
    spec, ex = clip
    px, ids = _inputs(ex.io, bi, bt, seed=6, text_len=13)  # a shape no other test calls; bucket 16
    key = ex.runner_key(bi, bt, 13)
    assert key not in ex.runners
    before, times = list(ex.runners), dict(ex.build_times)
    calls = []

    def boom(r, stage, problems):
        calls.append(stage.kind)
        raise fault

    with monkeypatch.context() as m:
        m.setitem(runner_mod._STAGE_BUILDERS, "attention", boom)
        with pytest.raises(type(fault), match=match):
            ex.encode(px, ids)
    assert calls == ["attention"]
    assert list(ex.runners) == before and ex.build_times == times  # nothing half-built cached
    img, txt = ex.encode(px, ids)
    assert key in ex.runners
    _close_to_reference(spec, px, ids, img, txt)
    return ex


@pytest.mark.slow
def test_keyboard_interrupt_while_building_a_runner_leaves_the_executor_usable(monkeypatch, clip):
    _fault_leaves_nothing_behind(monkeypatch, clip, KeyboardInterrupt(), None, 3, 2)


@pytest.mark.slow
def test_out_of_memory_while_building_names_the_shape_and_recovers(monkeypatch, clip):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    spec, ex = clip
    need = ex.runner_bytes(2, 3, 13) / 2**20
    _fault_leaves_nothing_behind(
        monkeypatch, clip, oom,
        rf"out of memory building the runner .* of a call of 2 image\(s\) and 3 text\(s\) of length 16: its "
        rf"buffers need about {need:.1f} MiB.*Nothing was cached.*Tried to allocate 20.00 MiB", 2, 3)


def test_runner_bytes_counts_the_buffers(clip):
    spec, ex = clip
    r = ex.runner(1, 2, 16)
    storages = {}
    for t in [r.output] + [v for b in r.buf.values() for v in vars(b).values() if isinstance(v, torch.Tensor)]:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    assert ex.runner_bytes(1, 2, 16) == sum(storages.values())


# --------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("executor", ["fused", "graph"])
def test_threads_equal_serial_calls_gpu(executor):
    from dualfuse import executors

    ex = executors.get(executor, dualfuse.load("clip-tiny"), dtype="fp16", device="cuda", max_graphs=16)
    g = torch.Generator().manual_seed(11)
    shapes = [(int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g)))
              for _ in range(12)]
    shapes = [(bi, bt) if bi + bt else (1, 1) for bi, bt in shapes]
    jobs = [_inputs(ex.io, bi, bt, seed=20 + i) for i, (bi, bt) in enumerate(shapes)]
    # two bad calls among them (an id out of the vocabulary): they raise, and nobody else's call does
    for j in (3, 8):
        px, ids = _inputs(ex.io, 1, 2, seed=40 + j)
        ids[1, 1] = ex.io.vocab_size
        jobs[j] = (px, ids)

    def call(job):
        try:
            return _call(ex, *job)
        except ValueError as e:
            assert "out of the vocabulary" in str(e)
            return "raised"

    serial = [call(job) for job in jobs]
    assert [j for j, out in enumerate(serial) if out == "raised"] == [3, 8]
    for per_thread in _run_threads(4, 20, jobs, call):
        for j, got in per_thread:
            if serial[j] == "raised":
                assert got == "raised", f"bad job {j} did not raise"
            else:
                assert got != "raised", f"job {j} raised for another thread's bad ids"
                assert all(_equal(x, y) for x, y in zip(got, serial[j])), f"job {j} differs"
    torch.cuda.synchronize()


def _slow_copy(src, stream):
    """src copied on ``stream`` behind ~50 ms of device work, so a reader not ordered after it reads garbage."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        out = torch.empty_like(src)
        out.copy_(src)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("executor", ["fused", "graph"])
def test_inputs_made_on_a_side_stream_are_waited_for_gpu(executor):
    from dualfuse import executors

    ex = executors.get(executor, dualfuse.load("clip-tiny"), dtype="fp16", device="cuda")
    px, ids = _inputs(ex.io, 2, 3, seed=30)
    want = ex.encode(px, ids)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    # (a) the call under the side stream, on inputs that stream is still writing
    px_s, ids_s = _slow_copy(px, s), _slow_copy(ids, s)
    with torch.cuda.stream(s):
        got = ex.encode(px_s, ids_s)
    torch.cuda.current_stream().wait_stream(s)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    # (b) made on the side stream, only an event recorded; the default stream waits on it, the call runs there
    px_s, ids_s = _slow_copy(px, s), _slow_copy(ids, s)
    done = torch.cuda.Event()
    done.record(s)
    torch.cuda.current_stream().wait_event(done)
    got = ex.encode(px_s, ids_s)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    # (c) back-to-back calls of one shape on two streams: the second waits for the first's replay and clone
    other = _inputs(ex.io, 2, 3, seed=31)
    want_other = ex.encode(*other)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        torch.cuda._sleep(50_000_000)
        first = ex.encode(px, ids)
    with torch.cuda.stream(s2):
        second = ex.encode(*other)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(first, want))
    assert all(torch.equal(x, y) for x, y in zip(second, want_other))


@pytest.mark.gpu
def test_interrupt_during_capture_restores_the_stream_gpu(monkeypatch):
    ex = FusedExecutor(dualfuse.load("clip-tiny"), dtype=torch.float16, device="cuda")
    spec = to_spec(dualfuse.load("clip-tiny"))
    px, ids = _inputs(ex.io, 2, 2, seed=40)
    stream = torch.cuda.current_stream()
    real = runner_mod.Runner.launch_all
    seen = []

    def launch_all(self):
        seen.append(torch.cuda.is_current_stream_capturing())
        if seen[-1]:
            raise KeyboardInterrupt
        return real(self)

    with monkeypatch.context() as m:
        m.setattr(runner_mod.Runner, "launch_all", launch_all)
        with pytest.raises(KeyboardInterrupt):
            ex.encode(px, ids)
    assert seen == [False, True]  # warm-up, then the capture
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    assert not ex.runners
    img, txt = ex.encode(px, ids)
    _close_to_reference(spec, px, ids, img, txt)


@pytest.mark.gpu
def test_interrupt_during_graph_executor_capture_gpu(monkeypatch):
    from dualfuse import executors
    from dualfuse.executors.graph import GraphExecutor

    ex = executors.get("graph", dualfuse.load("clip-tiny"), dtype="fp16", device="cuda")
    px, ids = _inputs(ex.io, 2, 2, seed=41)
    stream = torch.cuda.current_stream()
    real = GraphExecutor._forward

    def forward(self, px, ids):
        if torch.cuda.is_current_stream_capturing():
            raise KeyboardInterrupt
        return real(self, px, ids)

    with monkeypatch.context() as m:
        m.setattr(GraphExecutor, "_forward", forward)
        with pytest.raises(KeyboardInterrupt):
            ex.encode(px, ids)
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    assert not ex.graphs and ex.captures == 0
    img, txt = ex.encode(px, ids)
    _close_to_reference(ex.spec, px, ids, img, txt)


@pytest.mark.gpu
def test_capture_under_memory_pressure_gpu():
    """Most free device memory taken: a new shape's build/capture raises a clear OutOfMemoryError naming the
    shape, caches nothing; once the memory is free again the same call works."""
    model = dualfuse.load("clip-vit-b-32")  # ~1.1 MiB of buffers an image: a 1 GiB runner at a usual batch
    spec = to_spec(model)
    ex = FusedExecutor(model, dtype=torch.float16, device="cuda")
    batch = 64
    while ex.runner_bytes(batch, 0, None) < 2**30:
        batch *= 2
    g = torch.Generator().manual_seed(50)
    px = torch.randn(8, ex.io.channels, ex.io.image_size, ex.io.image_size, generator=g).to("cuda", DTYPE)
    px = px.repeat(batch // 8, 1, 1, 1)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - 256 * 2**20, dtype=torch.uint8, device="cuda")  # leaves far less than the runner needs
    try:
        with pytest.raises(torch.OutOfMemoryError, match=rf"{batch} image\(s\).*need about .* MiB"):
            ex.encode_image(px)
        assert not ex.runners
    finally:
        del hog
        torch.cuda.empty_cache()
    img = ex.encode_image(px[:4])
    _close_to_reference(spec, px[:4], None, img, None)
    img = ex.encode_image(px)
    _close_to_reference(spec, px[:8], None, img[:8], None)


@pytest.mark.slow
def test_a_copied_executor_has_its_own_lock_and_the_same_outputs():
    """copy.deepcopy of an executor (and its pickled state) drops its lock and makes a new one (a lock cannot be copied)."""
    import copy

    ex = FusedExecutor(dualfuse.load("clip-tiny"), dtype=DTYPE, device=DEV)
    px, ids = _inputs(ex.io, 1, 2, seed=3)
    want = ex.encode(px, ids)
    twin = copy.deepcopy(ex)
    assert twin._lock is not ex._lock and isinstance(twin._lock, type(ex._lock))
    assert all(torch.equal(a, b) for a, b in zip(twin.encode(px, ids), want))
    state = ex.__getstate__()
    assert "_lock" not in state
