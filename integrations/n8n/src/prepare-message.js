// Barnum event sender — step 2: the fields every WhatsApp message uses, so the
// per-type "WhatsApp: …" nodes only hold their wording. Runs after the
// signature check; input { event } is Barnum's payload (SPEC §3).
function ptDate(iso) {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(String(iso || ''));
  return m ? m[3] + '/' + m[2] + '/' + m[1] : '';
}
const LINKS = [
  ['confirm', 'Confirmar'],
  ['cancel', 'Cancelar'],
  ['reschedule', 'Remarcar'],
];
return $input.all().map((item) => {
  const event = item.json.event || {};
  const appt = event.appointment || null;
  const patient = (appt && appt.patient) || event.patient || {};
  const links = event.action_links || {};
  const professional = appt && appt.professional && appt.professional.name;
  const specialty = appt && appt.specialty && appt.specialty.name;
  const lastVisit = event.patient && ptDate(event.patient.last_visit_date);
  return {
    json: {
      event_type: event.event_type,
      event_id: event.event_id,
      // Cloud API wants the number in international format without "+".
      to: String(patient.phone || '').replace(/\D/g, ''),
      name: String(patient.name || '').trim(),
      firstName: String(patient.name || '').trim().split(/\s+/)[0] || '',
      patientId: patient.id || null,
      appointmentId: appt ? appt.id : null,
      date: appt ? ptDate(appt.date) : '',
      time: appt ? String(appt.time || '') : '',
      withWhom: professional ? ' com ' + professional : '',
      specialty: specialty ? ' de ' + specialty : '',
      lastVisit: lastVisit ? ' (' + lastVisit + ')' : '',
      links,
      // One line per link the event offers: "Confirmar: https://…".
      linkLines: LINKS.filter(([k]) => links[k]).map(([k, label]) => label + ': ' + links[k]).join('\n'),
      event,
    },
  };
});
