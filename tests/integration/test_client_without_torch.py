"""The robot client without torch (issue 20): in a subprocess where ``import torch`` fails
(``sys.modules["torch"] = None``), ``import fleetloop.client`` works, a FleetClient is made, and a
weights blob is verified and decoded to numpy arrays equal to the tensors torch gives. (A subprocess:
the unit tier starts none; the installed wheel without torch at all is test_client_wheel.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetloop.weights import state_dict_to_blob

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)

_NO_TORCH = r"""
import hashlib, json, sys
sys.modules["torch"] = None          # any import of torch now raises ImportError
import numpy as np
import fleetloop.client
from fleetloop.client import FleetClient, WeightClient, make_spec
from fleetloop.client.weight_client import views_checked
from fleetloop.weights import BlobAssembler, resolve_format

blob = open(sys.argv[1], "rb").read()
sink = BlobAssembler()
sink.append(blob)
arrays = views_checked(sink, hashlib.sha256(blob).hexdigest(), resolve_format("auto"))
client = FleetClient("127.0.0.1:1", "j", "a", [make_spec("state", "float32", [3])],
                     [make_spec("action", "float32", [2])], ["t"], spool_dir=sys.argv[2])
client.close(flush_timeout=0)
print(json.dumps({"format": resolve_format("auto"), "client_format": client.weights_format,
                  "weight_client": WeightClient(None, "j", "a", ()).tensor_format,
                  "types": sorted({type(v).__name__ for v in arrays.values()}),
                  "arrays": {k: [str(v.dtype), list(v.shape), np.asarray(v, np.float64).ravel().tolist()]
                             for k, v in arrays.items()},
                  "torch_loaded": any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v)}))
"""


def test_client_imports_and_decodes_weights_without_torch(tmp_path):
    state = {"net.0.weight": torch.randn(4, 3), "net.0.bias": torch.zeros(4), "h": torch.randn(2).to(torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(state_dict_to_blob(state))
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path), str(tmp_path / "spool")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["format"] == got["client_format"] == got["weight_client"] == "numpy"
    assert got["types"] == ["ndarray"] and not got["torch_loaded"]
    for name, t in state.items():
        dtype, shape, values = got["arrays"][name]
        want = "float32" if t.dtype == torch.bfloat16 else str(t.numpy().dtype)  # bfloat16: widened exactly
        assert shape == list(t.shape) and dtype == want, name
        np.testing.assert_array_equal(np.array(values), t.double().numpy().ravel(), err_msg=name)
