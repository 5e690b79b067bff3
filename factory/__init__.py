"""factory: a preference-dataset factory for reference-guided LLM alignment.

Importing the package stays light: torch, transformers and vllm are imported only inside the backend
that needs them.
"""

__version__ = "0.1.0"
