"""Turn one file of csrc/cuda (.cu / .cuh) into host C++ for the emulator (test only).

    python gen.py SRC OUT

Kernels stay functions (emu.h defines __global__ etc. away); launch.cu's
launch_kernel calls emu::launch_kernel under BSN_CUDA_EMU; the dynamic shared
memory becomes the emulated block's buffer.
"""
import sys

src_path, out_path = sys.argv[1], sys.argv[2]
out = open(src_path).read()
for inc in ("#include <cooperative_groups.h>\n", "#include <cuda_runtime.h>\n",
            "#include <c10/cuda/CUDAException.h>\n"):
    out = out.replace(inc, "")
smem = "extern __shared__ __align__(16) unsigned char bsn_smem_raw[];"
if smem in out:
    out = out.replace(smem, "unsigned char* bsn_smem_raw = emu::ctx.smem;")
assert "__shared__" not in out, "static shared memory: extend gen.py"
assert "<<<" not in out, "kernel launches go through launch_kernel (launch.cu)"
header = "#pragma once\n" if out_path.endswith(".cuh") else ""
out = header + f"// generated from {src_path} by tools/cuda_emu/gen.py\n#define BSN_CUDA_EMU 1\n#include \"emu.h\"\n" + out.replace("#pragma once\n", "")
open(out_path, "w").write(out)
