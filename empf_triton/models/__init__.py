"""empf_triton.models"""
