"""qafel: quantized asynchronous federated learning (QAFeL, FedBuff, naive) in a simulated async system."""

__version__ = "0.1.0"
