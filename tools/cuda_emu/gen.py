"""Turn csrc/cuda/kernels.cu into host C++ running on the emulator (test only)."""
import re, sys
src = open(sys.argv[1]).read()
out = src
out = out.replace('#include <cooperative_groups.h>', '#include "emu.h"')
out = out.replace('#include <cuda_runtime.h>\n', '')
out = out.replace('#include <c10/cuda/CUDAException.h>\n', '')
out = out.replace('extern __shared__ __align__(16) unsigned char bsn_smem_raw[];',
                  'unsigned char* bsn_smem_raw = emu::ctx.smem;')
assert 'emu::ctx.smem' in out

def split_top(s):
    parts, depth, cur = [], 0, ''
    for ch in s:
        if ch in '([<' and not (ch == '<' and False):
            if ch in '([':
                depth += 1
        if ch in ')]':
            depth -= 1
        if ch == ',' and depth == 0:
            parts.append(cur.strip()); cur = ''
        else:
            cur += ch
    parts.append(cur.strip())
    return parts

# kernel<<<g, b, s, stream>>>(args);  ->  emu::launch(g, b, s, false, [&] { kernel(args); });
pat = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);', re.S)
def repl(m):
    g, b, s, st = split_top(m.group(2))
    return f'emu::launch(static_cast<int>({g}), {b}, static_cast<size_t>({s}), false, [&] {{ {m.group(1)}({m.group(3)}); }});'
out, n = pat.subn(repl, out)
assert n >= 10, n
# cooperative launches
fwd_pat = re.compile(r'C10_CUDA_CHECK\(cudaLaunchCooperativeKernel\(kern,.*?stream\)\);', re.S)
parts = out.split('void launch_backward(')
parts[0], n1 = fwd_pat.subn('emu::launch(static_cast<int>(grid), kThreads, static_cast<size_t>(smem_a), true, [&] { fused_forward_kernel<scalar_t, GridSync>(A); });', parts[0])
parts[1], n2 = fwd_pat.subn('emu::launch(static_cast<int>(grid), kThreads, static_cast<size_t>(smem), true, [&] { fused_backward_kernel<scalar_t, GridSync>(A); });', parts[1])
assert n1 == 1 and n2 == 1, (n1, n2)
out = 'void launch_backward('.join(parts)
out += '\n#include "harness.inc"\n'
open(sys.argv[2], 'w').write(out)
print('generated', n, 'launches')
