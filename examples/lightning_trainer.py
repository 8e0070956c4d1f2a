"""Train a small MLP with Lightning and OIALR, with gradient accumulation, then resume it from a checkpoint.

    python examples/lightning_trainer.py          # offline, CPU, ~20 s; writes runs/lightning_trainer/

The data are synthetic (a random teacher network labels Gaussian inputs), so nothing is downloaded.
"""
import lightning as L
import torch
from torch import nn

import oialr
from oialr.integrations.lightning import OIALRCallback


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)


def teacher_data(n=4096):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 8, generator=g)).argmax(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)


def fit(epochs, ckpt_path=None):
    torch.manual_seed(0)
    module, callback = Classifier(), OIALRCallback(oialr.OIALRConfig(warmup_steps=100, update_every=50, cutoff=0.2))
    trainer = L.Trainer(max_epochs=epochs, accumulate_grad_batches=2, callbacks=[callback], accelerator="cpu",
                        default_root_dir="runs/lightning_trainer", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, teacher_data(), ckpt_path=ckpt_path)     # checkpoints include the controller's state
    return trainer, callback


if __name__ == "__main__":
    torch.set_num_threads(1)                             # a model this small runs fastest on one thread
    trainer, callback = fit(epochs=6)                    # 32 optimizer steps per epoch (64 batches, 2 per step)
    print(callback.controller.table())
    checkpoint = trainer.checkpoint_callback.best_model_path
    trainer, callback = fit(epochs=9, ckpt_path=checkpoint)     # a fresh module and Trainer, as after a restart
    summary = callback.controller.summary()
    print(f"resumed from {checkpoint}, ended at step {summary['step']}: trainable {summary['trainable_params']:,} "
          f"of {summary['dense_trainable_params']:,} dense parameters")
