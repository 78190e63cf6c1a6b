"""Small builders shared by the operator tests."""
import torch


def offsets_of(lengths):
    """int64 offsets [B+1] of jagged sequences with these lengths."""
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int64)
