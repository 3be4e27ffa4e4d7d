#!/usr/bin/env bash
# The TensorRT backend's CUDA side on a GPU machine (see bench/device_check.py).
#
# Carried in the ignored folder .whl/: wheels for Python 3.12 the machine lacks (pydantic and its
# parts, onnx2torch, pycuda's pure-Python dependencies) and pycuda's source archive. pycuda has no
# wheel; it is compiled there (nvcc is there) in the background while the cuda-python run goes.
#   device run:  bash bench/device_check.sh        (carry [".whl"]; results in $OUT)
set -u -o pipefail
OUT=${OUT:-build/device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cuda.bindings, torch; print('cuda-bindings', cuda.bindings.__version__, 'torch', torch.__version__)"
(
    set -e
    mkdir -p /tmp/pyc && tar xzf .whl/pycuda-*.tar.gz -C /tmp/pyc && cd /tmp/pyc/pycuda-*/
    python3 configure.py --cuda-root="$(dirname "$(dirname "$(command -v nvcc)")")"
    timeout 300 python3 setup.py build_ext --inplace
) >"$OUT/pycuda_build.log" 2>&1 &
build=$!
python3 -m bench.device_check --cuda cuda-python --json "$OUT/check_cuda_python.json" 2>&1 | tee "$OUT/check_cuda_python.log"
status=$?
wait $build; rc=$?
echo "pycuda build exit $rc after $SECONDS s"; tail -n 3 "$OUT/pycuda_build.log"
if [ $rc -eq 0 ]; then
    PYTHONPATH=$(echo /tmp/pyc/pycuda-*/):$PYTHONPATH python3 -m bench.device_check --cuda pycuda --quick \
        --json "$OUT/check_pycuda.json" 2>&1 | tee "$OUT/check_pycuda.log" || status=1
else
    status=1
fi
echo "all done in $SECONDS s; exit $status (0: every check passed with both CUDA bindings)"
exit $status
