#!/usr/bin/env bash
# A wheel larger than one upload to an offline GPU machine allows (e.g. 64 MiB with the work tree), sent in parts
# over consecutive uploads while that machine keeps its /tmp:
#   bash benchmarks/wheel_in_parts.sh split WHEEL [MIB]  # here: .whl/parts/<wheel>.NN of MIB MiB (default 40) + .sha256
#   bash benchmarks/wheel_in_parts.sh add                # there, after each upload of .whl/parts/<wheel>.sha256 and one
#                                                        # part: copies them to /tmp/wheel-parts; once all are there,
#                                                        # joins them, checks the sha256 and installs the wheel with
#                                                        # --no-deps into /tmp/site (put it on PYTHONPATH)
# e.g. onnxruntime-gpu 1.31 (CUDA 13, 255 MB) for the never-slower matrix's ONNX Runtime rows.
set -eu
case "${1:-}" in
split)
  wheel=$2; mib=${3:-40}; name=$(basename "$wheel")
  mkdir -p .whl/parts
  split -b "${mib}M" -d -a 2 "$wheel" ".whl/parts/$name."
  n=$(ls .whl/parts/"$name".?? | wc -l)
  (cd "$(dirname "$wheel")" && sha256sum "$name") | sed "s/\$/ $n/" > ".whl/parts/$name.sha256"
  echo "$n parts of ${mib} MiB in .whl/parts; carry .whl/parts/$name.sha256 and one part per call"
  ;;
add)
  mkdir -p /tmp/wheel-parts
  cp .whl/parts/* /tmp/wheel-parts/
  for sums in /tmp/wheel-parts/*.sha256; do
    read -r sum name n < "$sums"
    have=$(ls /tmp/wheel-parts/"$name".?? 2>/dev/null | wc -l)
    echo "$name: $have of $n parts here"
    if [ "$have" = "$n" ]; then
      cat /tmp/wheel-parts/"$name".?? > "/tmp/$name"
      echo "$sum  /tmp/$name" | sha256sum -c -
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$name"
      echo "installed $name into /tmp/site"
    fi
  done
  ;;
*)
  echo "usage: wheel_in_parts.sh split WHEEL [MIB] | add" >&2; exit 2
  ;;
esac
