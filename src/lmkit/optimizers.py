"""The optimizer a run trains with: the recipe's `optimizer:` section.

`adamw` (the default) is the Trainer's own (`training.optim` and its settings). `muon` is `torch.optim.Muon` on the
2-D weight matrices of the transformer blocks (attention and MLP), with AdamW on everything else: the token and
position embeddings, the tied head, biases and norms (the split of modded-nanogpt and Moonshot's Muon). Muon's update
is scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so both take `training.learning_rate`, its schedule and
`training.weight_decay`; AdamW keeps the Trainer's betas, epsilon and no decay on biases and norms. The two are one
`torch.optim.Optimizer` (`MuonWithAdamW`), so the Trainer's schedule, clipping, checkpoints and `--resume` treat it as
any other. LoRA runs keep AdamW: an adapter's low-rank factors are not the matrices Muon orthogonalises.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.settings import check_fields, setting


@dataclass
class OptimizerArgs:
    """The recipe's `optimizer:` section."""

    name: str = setting("adamw", "'adamw': the Trainer's (training.optim); 'muon': Muon on the blocks' 2-D matrices, "
                                 "AdamW on the rest, both at training.learning_rate.", choices=("adamw", "muon"))
    momentum: float = setting(0.95, "Muon's momentum (Nesterov).", above=0, below=1)
    ns_steps: int = setting(5, "Muon's Newton-Schulz iterations.", minimum=1, maximum=20)

    def __post_init__(self):
        check_fields(self, "optimizer")


def muon_parameter_names(model: nn.Module) -> set[str]:
    """The trainable 2-D matrices Muon takes: every one but the embeddings and the (tied) head."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embeddings.add(id(head.weight))
    return {name for name, param in model.named_parameters()
            if param.requires_grad and param.ndim == 2 and id(param) not in embeddings}


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over two: `muon` and `adamw` step together; their param groups are this one's (a schedule that
    sets a group's lr sets it for the optimizer that owns it), and the state dict holds both."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.parts = (muon, adamw)
        # Optimizer.__init__ sets up the hooks; the group it is given (a placeholder: it needs one) is not kept,
        # as param_groups below is the parts' own.
        super().__init__([torch.empty(0)], {})

    # Read live from the parts: loading a state dict replaces a part's group dicts, and a schedule must set the lr
    # of the groups the part steps with. Optimizer.__init__ assigns both; each part keeps its own.
    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @param_groups.setter
    def param_groups(self, value):
        pass

    @property
    def state(self) -> dict:
        return {**self.parts[0].state, **self.parts[1].state}

    @state.setter
    def state(self, value):
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.parts[0].state_dict(), "adamw": self.parts[1].state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.parts[0].load_state_dict(state_dict["muon"])
        self.parts[1].load_state_dict(state_dict["adamw"])


def build(model: nn.Module, spec: OptimizerArgs, args, decay_names: set[str]) -> MuonWithAdamW:
    """The `muon` optimizer of `model` under the training arguments `args` (learning rate, weight decay, AdamW's
    betas and epsilon); `decay_names`: the parameters the Trainer decays (not biases and norms)."""
    muon_names = muon_parameter_names(model)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    muon = torch.optim.Muon([param for name, param in named if name in muon_names], lr=args.learning_rate,
                            weight_decay=args.weight_decay, momentum=spec.momentum, ns_steps=spec.ns_steps,
                            adjust_lr_fn="match_rms_adamw")
    rest = [(name, param) for name, param in named if name not in muon_names]
    adamw = torch.optim.AdamW(
        [{"params": [p for n, p in rest if n in decay_names], "weight_decay": args.weight_decay},
         {"params": [p for n, p in rest if n not in decay_names], "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    return MuonWithAdamW(muon, adamw)
