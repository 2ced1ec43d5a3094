"""deltadit exporter: cut a diffusers DiT into subgraph engines and write the manifest the runtime runs from."""

__version__ = "0.1.0"
