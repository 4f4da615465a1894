"""Developer tools: benchmarks, the fuzzer, the component study, the GPU check, references."""
