"""privimage.kernels: fused per-sample norm and clipped-accumulation ops (Triton), with torch references."""
