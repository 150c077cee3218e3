from dashboard.views import regression

regression.render()
