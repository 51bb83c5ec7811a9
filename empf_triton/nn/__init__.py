"""Thin nn.Modules over the ops."""
