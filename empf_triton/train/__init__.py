"""empf_triton.train"""
