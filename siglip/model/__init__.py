"""The model: loading, the text rules of the checkpoint, the encoders (torch, CUDA graphs, OpenVINO) and the
random-weight checkpoints the tests and benchmarks build."""
