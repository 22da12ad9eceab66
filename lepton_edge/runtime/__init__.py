"""Device-side runtime. Imports neither torch nor TensorFlow (a test checks)."""
