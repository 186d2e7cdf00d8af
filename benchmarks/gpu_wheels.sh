#!/usr/bin/env bash
# Wheels for a GPU node without internet access whose image has torch and transformers but not the rest of mmdist's
# dependencies, into .whl/ of the repo root (ignored by git through .git/info/exclude). Run once on a machine that
# reaches PyPI, then carry .whl/ to the node with the checkout:
#     bash benchmarks/gpu_wheels.sh            # mmdist's missing dependencies (deepspeed, webdataset, gguf, pydantic)
#                                              # and the lock's transformers (with regex), whatever the image holds
#     bash benchmarks/gpu_wheels.sh quant      # plus bitsandbytes and torchao, for bench_quantized's GPU figures
# Versions come from constraints.txt. deepspeed ships a source package: `pip wheel` makes its pure-Python wheel.
# Then, on the GPU node, from the repository root with .whl/ in place:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site:$PWD DS_BUILD_OPS=0 && bash benchmarks/gpu_session.sh
# (where the carried transformers does not import beside the image's packages, `rm -rf /tmp/site/transformers*`
# falls back to the image's own).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pin() { sed -n "s/^\($1==[^ ;#]*\).*/\1/p" constraints.txt; }
BINARY=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl)
for n in 17 24 27 28 31 34 35; do BINARY+=(--platform "manylinux_2_${n}_x86_64"); done  # pip matches each tag exactly
names=(webdataset braceexpand gguf pydantic pydantic-core annotated-types typing-inspection hjson transformers regex)
[[ "${1:-}" == quant ]] && names+=(bitsandbytes torchao)
for name in "${names[@]}"; do
    spec=$(pin "$name"); [[ -n "$spec" ]] || { echo "no $name==... in constraints.txt" >&2; exit 1; }
    python3 -m pip download -q "${BINARY[@]}" "$spec"
done
ls .whl/deepspeed-* >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w .whl "$(pin deepspeed)"
du -sh .whl && ls .whl
