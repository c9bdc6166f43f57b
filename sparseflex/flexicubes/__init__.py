"""flexicubes"""
