"""diffsparse/models"""
