"""PyTorch's 60-minute blitz, "A Gentle Introduction to torch.autograd" (a small network in
place of torchvision's resnet18, whose weights cannot be downloaded here)."""
# --- imports ---
import torch
from torch import nn, optim
# --- end imports ---
import numpy as np

rng = np.random.default_rng(0)


def init_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.uniform(-0.1, 0.1, tuple(p.shape)).astype(np.float32)))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


model = SmallNet()
init_(model)
data = torch.from_numpy(rng.random((1, 3, 64, 64), dtype=np.float32))
labels = torch.from_numpy(rng.random((1, 1000), dtype=np.float32))

prediction = model(data)  # forward pass
loss = (prediction - labels).sum()
loss.backward()  # backward pass
optim_ = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
optim_.step()  # gradient descent
print(loss.item(), model.fc.bias[:4])

a = torch.tensor([2., 3.], requires_grad=True)
b = torch.tensor([6., 4.], requires_grad=True)
Q = 3*a**3 - b**2
external_grad = torch.tensor([1., 1.])
Q.backward(gradient=external_grad)
# check if collected gradients are correct
print(9*a**2 == a.grad)
print(-2*b == b.grad)

x = torch.from_numpy(rng.random((5, 5), dtype=np.float32))
y = torch.from_numpy(rng.random((5, 5), dtype=np.float32))
z = torch.from_numpy(rng.random((5, 5), dtype=np.float32)).requires_grad_()
a = x + y
print(f"Does `a` require gradients?: {a.requires_grad}")
b = x + z
print(f"Does `b` require gradients?: {b.requires_grad}")

# Freeze all the parameters in the network
for param in model.parameters():
    param.requires_grad = False
model.fc = nn.Linear(8, 10)
init_(model.fc)
# Optimize only the classifier
optimizer = optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
loss = (model(data) - labels[:, :10]).pow(2).sum()
loss.backward()
optimizer.step()
print(model.conv.weight.grad, model.fc.weight.grad.shape, model.fc.bias)
