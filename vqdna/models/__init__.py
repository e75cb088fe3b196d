"""nn.Modules."""
