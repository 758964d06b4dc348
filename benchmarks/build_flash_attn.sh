#!/bin/bash
# flash-attn 2.8.3 for the lent H200s, which have no flash-attn (PyPI ships it as source only): built on the GPU
# machine from the sdist, for sm_90 with bf16 and head dim 128 only (the files and the two dispatch switches cut to
# that; no dropout/ALiBi/soft-capping/local kernels), ~2 minutes on 16 cores. Used for docs/benchmarks.md
# (2026-12-02).
#   here:  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-build-isolation flash-attn==2.8.3 -d .fa
#          (keep .fa/ out of git, carry it)
#   there: bash benchmarks/build_flash_attn.sh .fa/flash_attn-2.8.3.tar.gz $OUT  -> $OUT/fa_site.tgz (1.5 MB)
#   use:   tar xzf fa_site.tgz -C /tmp/site  (package + extension + a dist-info that transformers recognises)
set -x
SDIST=${1:?usage: build_flash_attn.sh flash_attn-2.8.3.tar.gz OUT_DIR}; OUT=${2:?usage: build_flash_attn.sh flash_attn-2.8.3.tar.gz OUT_DIR}; SRC=/tmp/fab/flash_attn-2.8.3
mkdir -p /tmp/fab && tar xzf "$SDIST" -C /tmp/fab
cd $SRC
python3 - <<'PY'
import re
p = "csrc/flash_attn/src/static_switch.h"
s = open(p).read()
s = re.sub(r"#define FP16_SWITCH\(COND, \.\.\.\).*?\}\(\)\n",
  "#define FP16_SWITCH(COND, ...) [&] { TORCH_CHECK(!(COND), \"scratch build: bf16 only\"); using elem_type = cutlass::bfloat16_t; return __VA_ARGS__(); }()\n", s, flags=re.S)
s = re.sub(r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)\n",
  "#define HEADDIM_SWITCH(HEADDIM, ...) [&] { TORCH_CHECK(HEADDIM == 128, \"scratch build: head dim 128 only\"); constexpr static int kHeadDim = 128; return __VA_ARGS__(); }()\n", s, flags=re.S)
open(p, "w").write(s)
print(s[s.find("#define FP16_SWITCH"):s.find("#define FP16_SWITCH")+200])
PY
cat > setup_min.py <<'PY'
from pathlib import Path
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension
here = Path(__file__).parent
src = "csrc/flash_attn/src/"
files = ["csrc/flash_attn/flash_api.cpp"] + [src + f"flash_{k}_hdim128_bf16{c}_sm80.cu" for k in ("fwd", "bwd", "fwd_split") for c in ("", "_causal")]
nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
        "-DFLASHATTENTION_DISABLE_DROPOUT", "-DFLASHATTENTION_DISABLE_ALIBI", "-DFLASHATTENTION_DISABLE_SOFTCAP",
        "-DFLASHATTENTION_DISABLE_UNEVEN_K", "-DFLASHATTENTION_DISABLE_LOCAL", "-gencode", "arch=compute_90,code=sm_90"]
setup(name="flash_attn_2_cuda_min", ext_modules=[CUDAExtension(
    "flash_attn_2_cuda", files, extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc},
    include_dirs=[here / "csrc/flash_attn", here / "csrc/flash_attn/src", here / "csrc/cutlass/include"])],
    cmdclass={"build_ext": BuildExtension})
PY
nproc; nvcc --version | tail -2
export MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=9.0
time python3 setup_min.py build_ext --inplace > $OUT/build.log 2>&1; echo "build rc=$?"
tail -30 $OUT/build.log
ls -la *.so || exit 1
# install layout: the package, the extension, a dist-info that names distribution flash-attn 2.8.3
mkdir -p /tmp/fa_site && cp -r flash_attn /tmp/fa_site/ && rm -rf /tmp/fa_site/flash_attn/cute && cp flash_attn_2_cuda*.so /tmp/fa_site/
strip --strip-debug /tmp/fa_site/flash_attn_2_cuda*.so
D=/tmp/fa_site/flash_attn-2.8.3.dist-info && mkdir -p $D
printf "Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.8.3\n" > $D/METADATA
printf "flash_attn\nflash_attn_2_cuda\n" > $D/top_level.txt
(cd /tmp/fa_site && find . -type f | sed 's|^\./||;s|$|,,|' > flash_attn-2.8.3.dist-info/RECORD)
tar czf $OUT/fa_site.tgz -C /tmp/fa_site . && ls -la $OUT
cd /tmp && PYTHONPATH=/tmp/fa_site python3 - <<'PY'
import torch, flash_attn
from flash_attn import flash_attn_varlen_func, flash_attn_func
q = torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 4096, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn_like(k, requires_grad=True)
o = flash_attn_func(q, k, v, causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
print("max diff vs sdpa", (o - ref).abs().max().item())
o.sum().backward(); print("grad ok", q.grad.abs().sum().item() > 0)
from transformers.utils import is_flash_attn_2_available; print("transformers sees fa2:", is_flash_attn_2_available())
PY
