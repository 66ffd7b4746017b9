// The directives of shaders/matmul_coop.wgsl's cooperative matrices (after
// shaders/lib/f16.wgsl; the matrix side and types follow in coop16.wgsl or coop8.wgsl).
enable wgpu_cooperative_matrix;
// The cooperative operations run in subgroup-uniform control flow (the whole subgroup
// takes each branch, which is what Vulkan requires of them); naga's check asks for
// workgroup-uniform flow, which the kernel does not have where the workgroup holds more
// subgroups than it uses.
diagnostic(off, derivative_uniformity);
