"""empf_triton.deploy"""
