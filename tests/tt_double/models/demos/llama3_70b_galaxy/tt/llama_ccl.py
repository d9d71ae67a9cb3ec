"""Double of tt-metal models/demos/llama3_70b_galaxy/tt/llama_ccl.py: LINE_RS / LINE_AG are read once, at
import, exactly as the real module does; TT_CCL.close() is recorded."""
import os

import ttnn

LINE_RS = os.environ.get("LINE_RS", "0") == "1"
LINE_AG = os.environ.get("LINE_AG", "0") == "1"


class TT_CCL:
    def __init__(self, mesh_device, model_args, mode="decode"):
        self.mesh_device = mesh_device
        self.mode = mode

    def close(self):
        ttnn.calls.append(("tt_ccl.close", {}))
