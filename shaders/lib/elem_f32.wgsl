// The storage type of a kernel's activations (`elem`): f32 here, f16 in elem_f16.wgsl.
// A kernel written over `elem` reads with f32(x[i]) and writes with elem(v), computing in
// f32 either way, so the same text builds its f32 module and its f16-activation twin.
alias elem = f32;
