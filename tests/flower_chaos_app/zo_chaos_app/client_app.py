"""ClientApp: make_client_app with a node-local state_dir (ZO_CHAOS_STATE_DIR, set by the test for each SuperNode)."""

from __future__ import annotations

import os

from zo_optim.federated.flower import make_client_app

from .task import loss_fn, make_opt, model_fn

app = make_client_app(model_fn, make_opt, lambda context: loss_fn(), state_dir=os.environ["ZO_CHAOS_STATE_DIR"])
