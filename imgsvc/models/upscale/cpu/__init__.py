"""CPU kernels for upscaling: Winograd F(6,3) convolutions in C, built for this CPU."""
