"""Developer tooling: environment paths, the built-in tiny models, a real-ComfyUI harness, the demo job."""
