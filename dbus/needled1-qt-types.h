/* needled1-qt-types.h: the Qt types that dbus/org.needled1.xml names in its
 * org.qtproject.QtDBus.QtTypeName annotations, with their QDBusArgument operators, so that
 * qdbusxml2cpp's proxies and QDBusInterface can read every member of org.needled1.*.
 *
 * Include it before the generated proxy (qdbusxml2cpp -i needled1-qt-types.h ...) and call
 * needled1RegisterQtTypes() once, before the first call, e.g. at the start of main(). */
#pragma once

#include <QtCore/QList>
#include <QtCore/QMetaType>
#include <QtCore/QString>
#include <QtCore/QVariantMap>
#include <QtDBus/QDBusArgument>
#include <QtDBus/QDBusMetaType>

/* (dd): DepthRangeMm, SpeedRangeHz. */
struct NeedledRange {
        double min = 0;
        double max = 0;
};

/* (sss): one violation of ValidateProfile and GetProfiles' "violations". */
struct NeedledViolation {
        QString field;
        QString code;
        QString message;
};
typedef QList<NeedledViolation> NeedledViolationList;

/* (tuddddu): one sample of the Telemetry signal. */
struct NeedledTelemetrySample {
        quint64 deviceTimeUs = 0;
        quint32 sequence = 0;
        double depthMm = 0;
        double speedHz = 0;
        double currentMa = 0;
        double temperatureC = 0;
        quint32 flags = 0;
};
typedef QList<NeedledTelemetrySample> NeedledTelemetrySampleList;

/* aa{sv}: GetProfiles, GetHistory. */
typedef QList<QVariantMap> NeedledVariantMapList;

Q_DECLARE_METATYPE(NeedledRange)
Q_DECLARE_METATYPE(NeedledViolation)
Q_DECLARE_METATYPE(NeedledViolationList)
Q_DECLARE_METATYPE(NeedledTelemetrySample)
Q_DECLARE_METATYPE(NeedledTelemetrySampleList)
Q_DECLARE_METATYPE(NeedledVariantMapList)

inline QDBusArgument &operator<<(QDBusArgument &a, const NeedledRange &r) {
        a.beginStructure();
        a << r.min << r.max;
        a.endStructure();
        return a;
}

inline const QDBusArgument &operator>>(const QDBusArgument &a, NeedledRange &r) {
        a.beginStructure();
        a >> r.min >> r.max;
        a.endStructure();
        return a;
}

inline QDBusArgument &operator<<(QDBusArgument &a, const NeedledViolation &v) {
        a.beginStructure();
        a << v.field << v.code << v.message;
        a.endStructure();
        return a;
}

inline const QDBusArgument &operator>>(const QDBusArgument &a, NeedledViolation &v) {
        a.beginStructure();
        a >> v.field >> v.code >> v.message;
        a.endStructure();
        return a;
}

inline QDBusArgument &operator<<(QDBusArgument &a, const NeedledTelemetrySample &s) {
        a.beginStructure();
        a << s.deviceTimeUs << s.sequence << s.depthMm << s.speedHz << s.currentMa << s.temperatureC << s.flags;
        a.endStructure();
        return a;
}

inline const QDBusArgument &operator>>(const QDBusArgument &a, NeedledTelemetrySample &s) {
        a.beginStructure();
        a >> s.deviceTimeUs >> s.sequence >> s.depthMm >> s.speedHz >> s.currentMa >> s.temperatureC >> s.flags;
        a.endStructure();
        return a;
}

/* Registers every type above with the Qt meta-type and D-Bus systems. Idempotent. */
inline void needled1RegisterQtTypes() {
        qDBusRegisterMetaType<NeedledRange>();
        qDBusRegisterMetaType<NeedledViolation>();
        qDBusRegisterMetaType<NeedledViolationList>();
        qDBusRegisterMetaType<NeedledTelemetrySample>();
        qDBusRegisterMetaType<NeedledTelemetrySampleList>();
        qDBusRegisterMetaType<NeedledVariantMapList>();
}
