#!/usr/bin/env bash
# The distributed checks on GPUs (NCCL): the FSDP2 and data-parallel tests, then the sharding
# memory benchmark, on the GPUs this machine has. Run from the repository root after
# `make setup` (or with any environment that has rlhfkit and its test extras installed):
#
#     bash benchmarks/gpu_distributed.sh
#
# The tests start 2 ranks (one GPU each), so they need 2 GPUs; with one GPU only the benchmark
# runs, at 1 rank (nothing to shard: it then measures the overhead of the FSDP2 code path).
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
[print(i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
if [ "$gpus" -lt 1 ]; then
    echo "no CUDA device: run the tests on CPU with 'make test' instead" >&2
    exit 1
fi
if [ "$gpus" -ge 2 ]; then
    "$python" -m pytest -q -p no:cacheprovider tests/recipes/test_fsdp.py \
        tests/recipes/test_sft_distributed.py tests/recipes/test_rm_distributed.py \
        tests/equivalence/test_distributed_accumulate.py
    ranks=2
else
    echo "one GPU: skipping the 2-rank tests" >&2
    ranks=1
fi
"$python" benchmarks/bench_fsdp.py --ranks "$ranks" --steps 6 --warmup 2 --rounds 2
