"""MEmCom embedding compression for TorchRec."""
