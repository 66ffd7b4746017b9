// The storage type of a kernel's activations (`elem`) for `--precision f16` inference:
// f16, half the memory traffic and footprint of f32; arithmetic and accumulation stay f32
// (reads widen with f32(x[i]), writes round with elem(v)). Needs shaders/lib/f16.wgsl
// first in the module. The f32 twin is elem_f32.wgsl.
alias elem = f16;
