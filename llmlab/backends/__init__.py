"""Model backends: `base.LM` is the interface every command talks to (requests in, results out, in
order); `hf.HFLM` runs Hugging Face transformers models; `fake.FakeLM` answers from a queue for
fast tests that need no torch."""
