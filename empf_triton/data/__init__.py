"""empf_triton.data"""
