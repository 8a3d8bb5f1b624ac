"""fedfsd.deploy"""
