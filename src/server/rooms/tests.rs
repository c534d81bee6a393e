use super::*;
use crate::protocol::admin::{HostInfo, HostUpdate};

const ROOM: &str = "
[[group]]
name = \"room-1\"
members = [\"52:54:00:00:01:01\", \"52:54:00:00:01:02\"]
exit = \"exit\"
[group.job]
image = \"win\"

[[group]]
name = \"room-2\"
members = [\"52:54:00:00:02:01\"]
[group.job]
image = \"linux\"

[default_job]
image = \"win\"
";

const A: &str = "52:54:00:00:01:01";
const B: &str = "52:54:00:00:01:02";
const C: &str = "52:54:00:00:02:01";
const STRANGER: &str = "52:54:00:00:99:99";

fn rooms(extra: &str) -> Rooms {
    let cfg = ServerConfig::parse(&format!("{ROOM}{extra}")).unwrap();
    Rooms::with(Db::memory().unwrap(), &cfg).unwrap()
}

fn images(i: &str) -> bool {
    matches!(i, "win" | "linux")
}

fn start(r: &Rooms, group: &str) -> u64 {
    r.start(
        &StartRequest {
            group: Some(group.into()),
            ..Default::default()
        },
        images,
    )
    .unwrap()
}

fn report(r: &Rooms, deployment: u64, mac: &str, state: AgentState) -> Outcome {
    r.update(&Update {
        deployment,
        mac,
        state,
        progress: &Progress::default(),
        error: (state == AgentState::Failed).then_some("disk on fire"),
        disk: None,
        log: &[],
    })
    .unwrap()
    .expect("a task")
}

fn no_task(r: &Rooms, mac: &str) -> String {
    match r.claim(mac, &mut |_| true) {
        Err(ClaimError::NoTask(why)) => why,
        other => panic!("{mac} got {other:?}"),
    }
}

#[test]
fn an_unknown_pc_is_registered_and_boots_its_disk_even_with_a_default_job() {
    let r = rooms("");
    let id = start(&r, "room-1");
    assert_eq!(
        r.boot(STRANGER, &mut |_| true).unwrap(),
        Boot::Local {
            exit: ExitType::Auto,
            why: format!(
                "{STRANGER} is not registered: approve it, or open a deployment to unknown hosts"
            )
        }
    );
    assert!(no_task(&r, STRANGER).contains("not registered"));
    let h = r.hosts().unwrap();
    let s = h.iter().find(|h| h.mac == STRANGER).unwrap();
    assert!(!s.registered && s.task.is_none());
    // The room's own PCs get the agent.
    assert_eq!(
        r.boot(A, &mut |_| true).unwrap(),
        Boot::Agent { deployment: id }
    );
}

#[test]
fn a_finished_pc_is_not_imaged_again_until_asked() {
    let r = rooms("");
    let id = start(&r, "room-1");
    let c = r.claim(A, &mut |_| true).unwrap();
    assert_eq!((c.deployment, c.job.image.as_str()), (id, "win"));
    let o = report(&r, id, A, AgentState::Seeding);
    assert!(o.ended && !o.deployment_done);
    let t = r.tasks(id, 0, 10).unwrap();
    assert_eq!(t[0].verify.as_deref(), Some("pieces: passed"));
    // It reboots into the network: its disk, as its group says.
    assert!(matches!(
        r.boot(A, &mut |_| true).unwrap(),
        Boot::Local {
            exit: ExitType::Exit,
            ..
        }
    ));
    assert!(no_task(&r, A).contains(&format!("was imaged by deployment {id}")));
    // Asked again, it is imaged again, in a new deployment.
    let again = r
        .start(
            &StartRequest {
                hosts: vec![A.into()],
                ..Default::default()
            },
            images,
        )
        .unwrap();
    assert!(again > id);
    assert_eq!(
        r.boot(A, &mut |_| true).unwrap(),
        Boot::Agent { deployment: again }
    );
}

#[test]
fn failures_are_retried_up_to_the_limit_then_the_task_fails() {
    let r = rooms("");
    let id = r
        .start(
            &StartRequest {
                group: Some("room-2".into()),
                max_attempts: Some(2),
                ..Default::default()
            },
            images,
        )
        .unwrap();
    for attempt in 1..=2 {
        r.claim(C, &mut |_| true).unwrap();
        let o = report(&r, id, C, AgentState::Failed);
        assert_eq!(o.ended, attempt == 2);
    }
    let why = no_task(&r, C);
    assert!(
        why.contains("failed 2 times") && why.contains("disk on fire"),
        "{why}"
    );
    // The only task ended: the deployment is over.
    let d = r.deployment(id).unwrap().unwrap();
    assert_eq!((d.state, d.tasks.failed), (DeploymentState::Done, 1));
}

#[test]
fn two_rooms_deploy_two_images_at_once() {
    let r = rooms("");
    let one = start(&r, "room-1");
    let two = start(&r, "room-2");
    assert_ne!(one, two);
    assert_eq!(r.claim(A, &mut |_| true).unwrap().job.image, "win");
    assert_eq!(r.claim(C, &mut |_| true).unwrap().job.image, "linux");
    let e = r
        .start(
            &StartRequest {
                group: Some("room-1".into()),
                ..Default::default()
            },
            images,
        )
        .unwrap_err();
    assert!(format!("{e}").contains("already being deployed"), "{e}");
    assert!(report(&r, two, C, AgentState::Done).deployment_done);
    assert_eq!(
        r.deployment(one).unwrap().unwrap().state,
        DeploymentState::Running
    );
    // A report for another deployment's task is no task of this host.
    assert!(
        r.update(&Update {
            deployment: one,
            mac: C,
            state: AgentState::Done,
            progress: &Progress::default(),
            error: None,
            disk: None,
            log: &[],
        })
        .unwrap()
        .is_none()
    );
}

#[test]
fn an_open_deployment_takes_unknown_pcs_into_its_group() {
    let r = rooms("");
    let id = r
        .start(
            &StartRequest {
                group: Some("room-2".into()),
                open: true,
                ..Default::default()
            },
            images,
        )
        .unwrap();
    assert_eq!(
        r.boot(STRANGER, &mut |_| true).unwrap(),
        Boot::Agent { deployment: id }
    );
    assert_eq!(r.claim(STRANGER, &mut |_| true).unwrap().job.image, "linux");
    let g = r.groups().unwrap();
    assert!(g[1].members.contains(&STRANGER.to_string()));
    // A registered PC of another room does not join.
    assert!(matches!(
        r.boot(A, &mut |_| true).unwrap(),
        Boot::Local { .. }
    ));
}

#[test]
fn everything_survives_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let cfg = ServerConfig::parse(ROOM).unwrap();
    let id = {
        let r = Rooms::with(Db::open(t.path()).unwrap(), &cfg).unwrap();
        let id = start(&r, "room-1");
        r.claim(A, &mut |_| true).unwrap();
        r.claim(B, &mut |_| true).unwrap();
        report(&r, id, A, AgentState::Done);
        r.update_host(
            STRANGER,
            &HostUpdate {
                name: Some("spare".into()),
                ..Default::default()
            },
            images,
        )
        .unwrap();
        id
    };
    let r = Rooms::with(Db::open(t.path()).unwrap(), &cfg).unwrap();
    assert_eq!(r.running().unwrap(), vec![id]);
    assert!(no_task(&r, A).contains("was imaged"));
    assert_eq!(r.claim(B, &mut |_| true).unwrap().deployment, id);
    assert!(report(&r, id, B, AgentState::Done).deployment_done);
    let spare = r
        .hosts()
        .unwrap()
        .into_iter()
        .find(|h| h.mac == STRANGER)
        .unwrap();
    assert_eq!(spare.name.as_deref(), Some("spare"));
    assert_eq!(start(&r, "room-2"), id + 1);
}

#[test]
fn a_pcs_log_is_kept_bounded() {
    let r = rooms("");
    let id = start(&r, "room-2");
    r.claim(C, &mut |_| true).unwrap();
    for batch in 0..10 {
        let lines: Vec<String> = (0..60).map(|i| format!("line {batch}/{i}")).collect();
        r.update(&Update {
            deployment: id,
            mac: C,
            state: AgentState::Downloading,
            progress: &Progress::default(),
            error: None,
            disk: None,
            log: &lines,
        })
        .unwrap();
    }
    let log = r.log(C, None).unwrap();
    assert_eq!(log.deployment, Some(id));
    assert_eq!(log.lines.len(), LOG_LINES_KEPT as usize);
    assert_eq!(log.lines.last().unwrap().line, "line 9/59");
}

#[test]
fn made_up_macs_cannot_grow_the_database_without_bound() {
    let r = rooms("");
    for i in 0..(MAX_UNREGISTERED + 100) {
        let b = (i as u32).to_be_bytes();
        let mac = format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
        assert!(matches!(
            r.boot(&mac, &mut |_| true).unwrap(),
            Boot::Local { .. }
        ));
    }
    let unknown = r.hosts().unwrap().iter().filter(|h| !h.registered).count();
    assert_eq!(unknown as i64, MAX_UNREGISTERED);
}

#[test]
fn host_pages_put_unknown_hosts_first_latest_on_top() {
    let r = rooms("");
    let other = "52:54:00:00:99:01";
    r.boot(STRANGER, &mut |_| true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    r.boot(other, &mut |_| true).unwrap();
    let macs = |v: Vec<HostInfo>| v.into_iter().map(|h| h.mac).collect::<Vec<_>>();
    assert_eq!(
        macs(r.hosts().unwrap()),
        [other, STRANGER, A, B, C],
        "unknown first, the latest seen on top, then by MAC"
    );
    assert_eq!(macs(r.hosts_page(1, 2).unwrap()), [STRANGER, A]);
    assert_eq!(macs(r.hosts_page(4, 10).unwrap()), [C]);
}

#[test]
fn a_pc_left_over_when_expect_is_reached_can_be_deployed_again() {
    let r = rooms("");
    let req = StartRequest {
        group: Some("room-1".into()),
        expect: Some(1),
        ..Default::default()
    };
    let id = r.start(&req, images).unwrap();
    r.claim(A, &mut |_| true).unwrap();
    assert!(report(&r, id, A, AgentState::Done).deployment_done);
    // B never booted: its task is still open in a deployment that is done.
    let again = r.start(&req, images).unwrap();
    assert_eq!(r.claim(B, &mut |_| true).unwrap().deployment, again);
}

#[test]
fn group_templates_name_members_by_their_slot_and_own_names_win() {
    let cfg = "
[[group]]
name = \"lab12\"
members = [\"52:54:00:00:12:02\", \"52:54:00:00:12:01\"]
hostname = \"{group}-{slot:02}\"
[group.job]
image = \"win\"

[[host]]
mac = \"52:54:00:00:12:09\"
name = \"teacher\"
";
    let r = Rooms::with(Db::memory().unwrap(), &ServerConfig::parse(cfg).unwrap()).unwrap();
    // A member added through the API takes the next slot; the teacher's
    // own name wins over the template.
    let mut g = r.groups().unwrap().remove(0);
    g.members = vec!["52:54:00:00:12:09".into(), "52:54:00:00:12:03".into()];
    r.put_group(&g, images).unwrap();
    let members = r.groups().unwrap().remove(0).members;
    assert_eq!(members[..2], ["52:54:00:00:12:02", "52:54:00:00:12:01"]);
    // A label that is no host name is not written: the template names it.
    let label = HostUpdate {
        name: Some("front row".into()),
        ..Default::default()
    };
    r.update_host("52:54:00:00:12:03", &label, images).unwrap();
    let d = start(&r, "lab12");
    let claim = |mac: &str| {
        let c = r.claim(mac, &mut |_| true).unwrap();
        assert_eq!(c.deployment, d);
        (c.name.unwrap(), c.group_slot)
    };
    assert_eq!(claim("52:54:00:00:12:02"), (Some("lab12-01".into()), 1));
    assert_eq!(claim("52:54:00:00:12:01"), (Some("lab12-02".into()), 2));
    assert_eq!(claim("52:54:00:00:12:09"), (Some("teacher".into()), 3));
    assert_eq!(claim("52:54:00:00:12:03"), (Some("lab12-04".into()), 4));
    // A template that cannot make a name is refused where it is set.
    g.hostname = Some("lab12_{slot}".into());
    let e = format!("{:#}", r.put_group(&g, images).unwrap_err());
    assert!(e.contains("holds '_'"), "{e}");
}

#[test]
fn a_failure_while_fitting_an_imaged_pc_fails_its_task() {
    let r = rooms("");
    let id = start(&r, "room-2");
    r.claim(C, &mut |_| true).unwrap();
    assert!(report(&r, id, C, AgentState::Seeding).deployment_done);
    // The room is done; the PC grows, names its disk, runs its hooks.
    report(&r, id, C, AgentState::Fitting);
    report(&r, id, C, AgentState::Failed);
    let t = r.tasks(id, 0, 10).unwrap();
    assert_eq!(t[0].task, TaskState::Failed);
    assert_eq!(
        t[0].error.as_deref(),
        Some("after imaging: disk on fire"),
        "{t:?}"
    );
    let d = r.deployment(id).unwrap().unwrap();
    assert_eq!(d.tasks.failed, 1);
}

#[test]
fn a_pc_restarted_while_fitting_is_failed_not_done() {
    let r = rooms("");
    let id = start(&r, "room-2");
    r.claim(C, &mut |_| true).unwrap();
    report(&r, id, C, AgentState::Seeding);
    report(&r, id, C, AgentState::Fitting);
    // Power cut while growing: the PC network-boots again.
    let Boot::Local { why, .. } = r.boot(C, &mut |_| true).unwrap() else {
        panic!("sent to the agent")
    };
    assert!(why.contains("restarted while fitting"), "{why}");
    let t = r.tasks(id, 0, 10).unwrap();
    assert_eq!(t[0].task, TaskState::Failed, "{t:?}");
    // A PC that finished fitting stays done.
    let r = rooms("");
    let id = start(&r, "room-2");
    r.claim(C, &mut |_| true).unwrap();
    report(&r, id, C, AgentState::Fitting);
    report(&r, id, C, AgentState::Done);
    assert!(no_task(&r, C).contains("was imaged by deployment"));
    assert_eq!(r.tasks(id, 0, 10).unwrap()[0].task, TaskState::Done);
}

#[test]
fn a_hosts_group_is_its_room_for_the_tracker() {
    let r = rooms("");
    assert_eq!(r.group_of(A).unwrap().as_deref(), Some("room-1"));
    assert_eq!(r.group_of(C).unwrap().as_deref(), Some("room-2"));
    // Unknown, or known and in no group: the tracker goes by its subnet.
    assert_eq!(r.group_of(STRANGER).unwrap(), None);
    r.boot(STRANGER, &mut |_| false).unwrap();
    assert_eq!(r.group_of(STRANGER).unwrap(), None);
}
