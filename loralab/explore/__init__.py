"""The low-rank explorer: an interactive page that truncates a matrix's SVD at a rank slider.

    loralab explore [--adapter DIR]      # serves http://127.0.0.1:8765/

spectrum.py  the matrices and their SVDs (dense, or from an adapter's factors), energy and truncation error
adapter.py   one PEFT-format adapter directory read with safetensors and NumPy
server.py    the HTTP server (standard library) and its JSON endpoints
static/      the page: index.html, explore.js (plain JS, no build step), explore.css
"""

from .server import Catalogue, ExploreServer, make_server, serve
from .spectrum import Spectrum, dense_svd, energy, factored_svd, truncation_error

__all__ = ["Catalogue", "ExploreServer", "make_server", "serve", "Spectrum", "dense_svd", "factored_svd", "energy",
           "truncation_error"]
