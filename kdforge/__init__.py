"""kdforge: turn big vision models into strong small ones."""
__version__ = "0.1.0"
