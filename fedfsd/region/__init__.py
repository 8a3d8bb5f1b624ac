"""fedfsd.region"""
