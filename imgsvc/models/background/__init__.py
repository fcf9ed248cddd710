"""Background removal: rembg sessions on onnxruntime (and their graph rewrite at load)."""
