"""Model weights: the manifest, `imgsvc weights pull`, versions, ncnn → safetensors."""
