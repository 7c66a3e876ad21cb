// needled-client.cpp: a small needled client in C++ with QtDBus, on the proxies qdbusxml2cpp makes
// from the shipped dbus/org.needled1.xml and the types of the installed needled1-qt-types.h (as a
// Qt clinic application would be built).
//
// Lists the pens, follows a pen's property changes, reads the complex-typed properties the
// annotations name (DepthRangeMm, Cartridge), arms an installed profile, runs a short session,
// reads the telemetry socket (OpenTelemetry), handles a named error, and prints the figures the
// ledger recorded (SessionRecorded).
//
//     needled-client-qt [--session] SERIAL
//
// Exit status 0 when the session ran, ended "stopped" and the telemetry was consecutive.
#include <QtCore/QCoreApplication>
#include <QtCore/QSocketNotifier>
#include <QtCore/QTimer>
#include <QtDBus/QDBusConnection>
#include <QtDBus/QDBusUnixFileDescriptor>
#include <cstdio>
#include <sys/socket.h>
#include <unistd.h>

#include "needled1-qt-types.h"
#include "needled1proxy.h"

namespace {

constexpr int kRecordSize = 72; // docs/telemetry.md, version 1
constexpr int kSequenceOffset = 4;
constexpr int kDroppedOffset = 24;
constexpr int kStopAfterMs = 1500;
constexpr int kGiveUpAfterMs = 15000;

quint32 le32(const unsigned char *p) {
        return quint32(p[0]) | quint32(p[1]) << 8 | quint32(p[2]) << 16 | quint32(p[3]) << 24;
}

class Client : public QObject {
        Q_OBJECT
public:
        quint64 records = 0, gaps = 0;
        quint32 dropped = 0, nextSequence = 0;
        bool haveSequence = false;
        int propertyChanges = 0;
        QString reason;
        QVariantMap figures;
        int fd = -1;

        // One record if one is waiting; false when none is (or the socket closed).
        bool takeRecord() {
                unsigned char record[256];
                ssize_t n = recv(fd, record, sizeof record, MSG_DONTWAIT);
                if (n < kRecordSize)
                        return false;
                quint32 sequence = le32(record + kSequenceOffset);
                if (haveSequence && sequence != nextSequence)
                        gaps += quint32(sequence - nextSequence);
                haveSequence = true;
                nextSequence = sequence + 1;
                dropped = le32(record + kDroppedOffset);
                records++;
                return true;
        }

public slots:
        // org.freedesktop.DBus.Properties.PropertiesChanged of the pen.
        void onPropertiesChanged(const QString &interface, const QVariantMap &changed, const QStringList &) {
                for (auto it = changed.constBegin(); it != changed.constEnd(); ++it) {
                        propertyChanges++;
                        if (it.key() == QLatin1String("State") || it.key() == QLatin1String("SessionId"))
                                std::printf("  %s = '%s'\n", qPrintable(it.key()), qPrintable(it.value().toString()));
                }
                (void) interface;
        }
};

} // namespace

int main(int argc, char **argv) {
        QCoreApplication app(argc, argv);
        needled1RegisterQtTypes();
        QStringList args = app.arguments().mid(1);
        bool session = args.removeAll(QStringLiteral("--session")) > 0;
        if (args.size() != 1) {
                std::fprintf(stderr, "usage: needled-client-qt [--session] SERIAL\n");
                return 2;
        }
        QDBusConnection bus = session ? QDBusConnection::sessionBus() : QDBusConnection::systemBus();
        const QString name = QStringLiteral("org.needled");
        OrgNeedled1ManagerInterface manager(name, QStringLiteral("/org/needled"), bus);
        if (!manager.isValid()) {
                std::fprintf(stderr, "cannot reach needled: %s\n", qPrintable(bus.lastError().message()));
                return 1;
        }
        std::printf("needled %s, features %s\n", qPrintable(manager.version()),
                    qPrintable(manager.features().join(QStringLiteral(", "))));
        for (const QDBusObjectPath &p : manager.pens()) {
                OrgNeedled1PenInterface pen(name, p.path(), bus);
                std::printf("pen %s %s\n", qPrintable(pen.serial()), qPrintable(pen.state()));
        }

        // A named error: a serial nobody has.
        QDBusPendingReply<QDBusObjectPath> missing = manager.FindPen(QStringLiteral("NO-SUCH-PEN"));
        missing.waitForFinished();
        if (missing.isError())
                std::printf("named error: %s: %s\n", qPrintable(missing.error().name()),
                            qPrintable(missing.error().message()));

        QDBusPendingReply<QDBusObjectPath> found = manager.FindPen(args.first());
        found.waitForFinished();
        if (found.isError()) {
                std::fprintf(stderr, "FindPen: %s\n", qPrintable(found.error().message()));
                return 1;
        }
        OrgNeedled1PenInterface pen(name, found.value().path(), bus);
        NeedledRange depth = pen.depthRangeMm();
        std::printf("depth range %.2f..%.2f mm, cartridge %s\n", depth.min, depth.max,
                    qPrintable(pen.cartridge().value(QStringLiteral("id")).toString()));

        Client client;
        bus.connect(name, pen.path(), QStringLiteral("org.freedesktop.DBus.Properties"),
                    QStringLiteral("PropertiesChanged"), &client,
                    SLOT(onPropertiesChanged(QString, QVariantMap, QStringList)));
        QObject::connect(&pen, &OrgNeedled1PenInterface::SessionRecorded,
                         [&client](const QString &, const QVariantMap &figures) { client.figures = figures; });
        QObject::connect(&pen, &OrgNeedled1PenInterface::SessionEnded, [&client, &app](const QString &, const QString &r) {
                client.reason = r;
                app.quit();
        });

        QDBusPendingReply<QDBusUnixFileDescriptor> telemetry = pen.OpenTelemetry();
        telemetry.waitForFinished();
        if (telemetry.isError()) {
                std::fprintf(stderr, "OpenTelemetry: %s\n", qPrintable(telemetry.error().message()));
                return 1;
        }
        client.fd = dup(telemetry.value().fileDescriptor());
        QSocketNotifier notifier(client.fd, QSocketNotifier::Read);
        QObject::connect(&notifier, &QSocketNotifier::activated, [&client, &notifier]() {
                if (!client.takeRecord())
                        notifier.setEnabled(false); // closed: the pen went
        });

        QDBusPendingReply<> armed = pen.LoadProfile(QStringLiteral("acne-scars-cheeks"));
        armed.waitForFinished();
        if (armed.isError()) {
                std::fprintf(stderr, "LoadProfile: %s\n", qPrintable(armed.error().message()));
                return 1;
        }
        QVariantMap options{{QStringLiteral("label"), QStringLiteral("example")}};
        QDBusPendingReply<QString> started = pen.Start(options);
        started.waitForFinished();
        if (started.isError()) {
                std::fprintf(stderr, "Start: %s\n", qPrintable(started.error().message()));
                return 1;
        }
        std::printf("session %s started\n", qPrintable(started.value()));
        QTimer::singleShot(kStopAfterMs, [&pen]() { pen.Stop(); });
        QTimer::singleShot(kGiveUpAfterMs, &app, &QCoreApplication::quit);
        app.exec();

        while (client.takeRecord())
                ;
        close(client.fd);
        qulonglong strokes = client.figures.value(QStringLiteral("strokes")).toULongLong();
        std::printf("ended: %s (%.1f s, %llu strokes)\n", qPrintable(client.reason),
                    client.figures.value(QStringLiteral("duration_s")).toDouble(), strokes);
        std::printf("telemetry: %llu records, %llu gaps, %u dropped; %d property changes\n",
                    (unsigned long long) client.records, (unsigned long long) client.gaps, client.dropped,
                    client.propertyChanges);
        bool ok = client.reason == QStringLiteral("stopped") && strokes > 0 && client.records > 100 &&
                  client.gaps == client.dropped;
        return ok ? 0 : 1;
}

#include "needled-client.moc"
