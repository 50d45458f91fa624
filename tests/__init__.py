import os

# Tests never reach a model hub: fail fast instead of retrying. Set here, before any test module imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
