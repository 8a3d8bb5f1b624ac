"""fedfsd.privacy"""
