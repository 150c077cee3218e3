from dashboard.views import jobs

jobs.render()
