"""Reference methods the benchmarks and tests measure the product against; nothing on the device
imports them (they are not part of the runtime).

- `hog.HogPca`: HOG + PCA int8 codes, the classic baseline for compact image embeddings.
"""
