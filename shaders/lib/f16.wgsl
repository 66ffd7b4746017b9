// The f16 extension, for modules that read or write f16 storage (`--precision f16`
// weights and activations). `enable` must precede every declaration of a module, so this
// file comes first in any shader it is part of; the host builds such modules only on
// devices with SHADER_F16.
enable f16;
