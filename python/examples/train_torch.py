import torch, torch.nn.functional as F, torchvision
import simclr_pipeline as sp

data = sp.TorchDataset("pipelines/demo.yaml", threads=2)  # generated shapes: no download
net = torchvision.models.resnet18(num_classes=64)  # encoder + linear projection to 64-d
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-6)

def nt_xent(z1, z2, t=0.2):  # the SimCLR loss: each view's positive is the other view
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / t).fill_diagonal_(float("-inf"))
    n = len(z1)
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))

for epoch in range(2):
    data.set_epoch(epoch)  # new shuffle and augmentations each epoch
    for batch in data:  # two float32 (B, 3, 32, 32) views, shared with Rust (no copy)
        x1, x2 = batch["views"]
        loss = nt_xent(net(x1), net(x2))
        opt.zero_grad(); loss.backward(); opt.step()
    print(f"epoch {epoch}: loss {loss.item():.3f}")
